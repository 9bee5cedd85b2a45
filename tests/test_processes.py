"""The processes backend: jobs on worker processes forked from the run, each on its own torch threads. The same
tiny study run there gives the local backend's scores; a failing job or a dying worker is a one-line error."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

from conftest import cfg_for
from mergeability import backends
from mergeability.backends import ForkPool, LocalPool, local_pool
from mergeability.errors import MergeabilityError

FORK_TIMEOUT = pytest.mark.timeout(300)  # every test here starts processes


def _where(context, shared, payload):
    return os.getpid(), context, shared, payload * 2


def _fail(context, shared, payload):
    if payload == 1:
        raise ValueError("bad payload\nsecond line")
    if payload == 2:
        raise MergeabilityError("the job's own error\nwith detail")
    return payload


def _die(context, shared, payload):
    os._exit(3)


@FORK_TIMEOUT
def test_fork_pool_runs_every_job_in_forked_workers_with_their_context():
    pool = ForkPool({"model": "ctx"}, [1, 2, 3], workers=2)
    try:
        out = dict(pool.map(_where, [5, 6, 7, 8]))
    finally:
        pool.close()
    assert sorted(out) == [0, 1, 2, 3]
    assert [out[i][3] for i in range(4)] == [10, 12, 14, 16]
    assert all(o[1] == {"model": "ctx"} and o[2] == [1, 2, 3] for o in out.values())
    assert os.getpid() not in {o[0] for o in out.values()}
    assert backends._FORKED is None  # closed: the forks' inheritance is released


@FORK_TIMEOUT
@pytest.mark.parametrize("payload, message", [
    (1, "job 0 failed in a worker process: ValueError: bad payload"),
    (2, "the job's own error"),
])
def test_fork_pool_job_failure_is_one_line(payload, message):
    pool = ForkPool(None, None, workers=2)
    try:
        with pytest.raises(MergeabilityError) as e:
            list(pool.map(_fail, [payload]))
    finally:
        pool.close()
    assert str(e.value) == message


@FORK_TIMEOUT
def test_fork_pool_worker_death_is_one_line():
    pool = ForkPool(None, None, workers=2)
    try:
        with pytest.raises(MergeabilityError, match="a worker process died"):
            list(pool.map(_die, [0, 1]))
    finally:
        pool.close()


def _nap(context, shared, payload):
    if payload:
        time.sleep(payload)
    return os.getpid()


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie no reaper collects has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


@FORK_TIMEOUT
def test_fork_pool_stops_its_workers_at_once_when_the_driver_stops_reading():
    pool = ForkPool(None, None, workers=2)
    jobs = pool.map(_nap, [0, 60, 60])
    _, pid = next(jobs)
    start = time.monotonic()
    jobs.close()  # what Ctrl-C or a failed record does to the stage's loop: the 60 s jobs must not be waited for
    pool.close()
    assert time.monotonic() - start < 10
    assert _wait_gone([pid], 10)


@FORK_TIMEOUT
def test_fork_pool_workers_die_with_a_killed_driver(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, sys.argv[1])
        from test_processes import _nap
        from mergeability.backends import ForkPool
        pool = ForkPool(None, None, workers=2)
        pids = {pid for _, pid in pool.map(_nap, [0.5, 0.5, 0.5, 0.5])}
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(120)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__)], stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert pids and not any(_gone(p) for p in pids)  # workers idle, waiting for jobs
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        assert _wait_gone(pids, 10)
    finally:
        driver.kill()
        driver.wait(10)


def test_processes_backend_runs_locally_where_forking_is_unsafe(tiny_model_dir, dataset, monkeypatch):
    cfg = cfg_for(tiny_model_dir, dataset, backend="processes")
    pool = local_pool(cfg, "ctx", None)
    try:
        assert isinstance(pool, ForkPool)
    finally:
        pool.close()
    monkeypatch.setattr(backends.sys, "platform", "darwin")
    assert isinstance(local_pool(cfg, "ctx", None), LocalPool)
    assert isinstance(local_pool(cfg_for(tiny_model_dir, dataset, backend="local"), "ctx", None), LocalPool)


@FORK_TIMEOUT
def test_processes_backend_gives_the_local_scores(tiny_model_dir, dataset, tmp_path):
    from mergeability.experiments import run_experiment
    from mergeability.pipelines import run_examples

    quiet = Console(quiet=True)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2, threads=1), tmp_path / "local", console=quiet)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2, threads=1, backend="processes", workers=2),
                 tmp_path / "forked", console=quiet)
    assert (tmp_path / "forked" / "scores.csv").read_bytes() == (tmp_path / "local" / "scores.csv").read_bytes()
    for q in ("SELECT id, correct, scores FROM items ORDER BY id",
              "SELECT item_id, kept, train_loss, post_scores FROM updates ORDER BY item_id",
              "SELECT target, trial, partners, correct, probs FROM trials ORDER BY target, trial"):
        rows = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "forked")}
        assert rows["forked"] == rows["local"] and len(rows["local"]) > 0, q
    run_experiment("groups", tmp_path / "local", quiet)
    run_experiment("groups", tmp_path / "forked", quiet)
    q = "SELECT key, result FROM experiments ORDER BY key"
    exp = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "forked")}
    assert exp["forked"] == exp["local"] and len(exp["local"]) > 0
