"""The processes backend: jobs on worker processes forked from the run, each on its own torch threads. The same
tiny study run there gives the local backend's scores; a failing job or a dying worker is a one-line error."""

import os
import sqlite3

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
