"""The Ray backend: the same study on a local Ray (2 CPUs) gives exactly the local backend's scores; a job that
fails, a worker that dies or a cluster that is gone is a one-line error, never a wait without end."""

import os
import shutil
import signal
import sqlite3
import sys

import pytest
import ray  # part of the test extra: pip install -e .[test]
import torch
from rich.console import Console

from conftest import cfg_for, make_pool, random_update, run_cli, task_cfg_for
from mergeability.errors import MergeabilityError

# A Ray test waits inside Ray's C++ (ray.wait/get), out of reach of pytest-timeout's SIGALRM: the thread method
# ends a stuck run instead. RayPool gives up first (MERGEABILITY_RAY_TIMEOUT below), with a one-line error.
RAY_TEST_TIMEOUT = pytest.mark.timeout(540, method="thread")
POOL_TIMEOUT_S = "300"


def _start_ray():
    """This module's own 2-CPU Ray: address="local" never joins a cluster named by RAY_ADDRESS or left by
    `ray start`. Ray's init makes SIGTERM raise SystemExit in whatever test runs; the old handler is put back so
    that a SIGTERM (CI's, timeout's) stops the run instead of failing one test and going on into the next."""
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    signal.signal(signal.SIGTERM, sigterm)


def _alive() -> bool:
    return ray.is_initialized() and any(n["Alive"] for n in ray.nodes())


@pytest.fixture(scope="module")
def ray_module():
    """Ray for this module, leaving nothing behind: the environment Ray writes into (RAY_AUTH_MODE,
    PYTHONBREAKPOINT, …) is restored and the cluster shut down."""
    if ray.is_initialized():  # an earlier module's Ray (conftest fails that module): not this 2-CPU cluster
        ray.shutdown()
    env = dict(os.environ)
    os.environ["MERGEABILITY_RAY_TIMEOUT"] = POOL_TIMEOUT_S
    try:
        _start_ray()
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(env)


@pytest.fixture
def local_ray(ray_module):
    """The module's Ray, started again if an earlier test lost it: one lost cluster fails one test, not all."""
    if not _alive():
        ray.shutdown()
        _start_ray()
    yield


@RAY_TEST_TIMEOUT
def test_ray_backend_gives_identical_scores(tiny_model_dir, dataset, tmp_path, local_ray):
    from mergeability.experiments import run_experiment
    from mergeability.pipelines import run_examples

    quiet = Console(quiet=True)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2), tmp_path / "local", console=quiet)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2, backend="ray", workers=2), tmp_path / "ray",
                 console=quiet)
    assert (tmp_path / "ray" / "scores.csv").read_bytes() == (tmp_path / "local" / "scores.csv").read_bytes()
    q = "SELECT target, trial, partners, correct FROM trials ORDER BY target, trial"
    rows = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "ray")}
    assert rows["ray"] == rows["local"] and len(rows["ray"]) > 0
    # an experiment on Ray records the same merge-set results as one run locally
    run_experiment("groups", tmp_path / "local", quiet)
    run_experiment("groups", tmp_path / "ray", quiet, {"backend": "ray", "workers": 2})
    q = "SELECT key, result FROM experiments ORDER BY key"
    exp = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "ray")}
    assert exp["ray"] == exp["local"] and len(exp["ray"]) > 0


@pytest.mark.timeout(120)
def test_ray_backend_without_ray_says_how_to_install(tiny_model_dir, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20",
                            "--partners", "2", "--backend", "ray", "--out", out], capsys)
    assert code == 2 and "pip install 'mergeability[ray]'" in err and err.count("\n") == 1
    assert not out.exists()


@RAY_TEST_TIMEOUT
def test_ray_backend_task_run_is_identical(tiny_model_dir, tmp_path, local_ray):
    from mergeability.pipelines import run_tasks

    pool = make_pool(tmp_path / "pool", tiny_model_dir, n_weak=4)
    quiet = Console(quiet=True)
    run_tasks(task_cfg_for(tiny_model_dir, pool), tmp_path / "local", console=quiet)
    run_tasks(task_cfg_for(tiny_model_dir, pool, backend="ray", workers=2), tmp_path / "ray", console=quiet)
    assert (tmp_path / "ray" / "scores.csv").read_bytes() == (tmp_path / "local" / "scores.csv").read_bytes()
    q = "SELECT target, trial, partners, correct, probs FROM trials ORDER BY target, trial"
    rows = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "ray")}
    assert rows["ray"] == rows["local"] and len(rows["ray"]) == 4 * 3


@RAY_TEST_TIMEOUT
def test_ray_backend_weighted_experiment_is_identical(tiny_model_dir, tmp_path, local_ray, monkeypatch):
    from mergeability import backends
    from mergeability.experiments import Weighted, run_experiment
    from mergeability.experiments.weighted import SCALE_NAME, scales
    from mergeability.pipelines import run_tasks
    from mergeability.store import Store
    from mergeability.updates import save_update

    pool = make_pool(tmp_path / "pool", tiny_model_dir, n_weak=3, n_strong=3)
    shapes = {f"model.layers.{i}.self_attn.{m}": (32 if m == "q_proj" else 16, 32) for i in range(2)
              for m in ("q_proj", "k_proj", "v_proj")}
    for k in (4, 5, 6):  # near-zero adapters for the strong tasks: trained ones unlearn them, and §6 drops those
        null = random_update(shapes, 2, scale=1e-6, seed=k, base=str(tiny_model_dir), dtype=torch.float32)
        save_update(null, pool / "adapters" / f"adapter-task{k}")
    quiet = Console(quiet=True)
    run_tasks(task_cfg_for(tiny_model_dir, pool, trials=1, partners=1), tmp_path / "run", console=quiet)
    spec = Weighted(sets=2, low=1, high=1, temperature=0.5, sweep=(), methods=("mean", "knots"))
    jobs = []

    class CountingRayPool(backends.RayPool):  # proves the units ran on Ray actors
        def map(self, job, payloads):
            jobs.extend(payloads)
            return super().map(job, payloads)

    monkeypatch.setattr(backends, "RayPool", CountingRayPool)
    rows = {}
    for backend in ("local", "ray"):
        d = tmp_path / backend
        shutil.copytree(tmp_path / "run", d)
        run_experiment(spec, d, quiet, {"backend": backend, "workers": 2})
        store = Store(d / "results.sqlite", lock=False)
        rows[backend] = store.experiment_rows("weighted") | store.experiment_rows(SCALE_NAME)
        used = {n for w, s in store.get_meta("weighted_plan")["sets"] for n in w + s}
        store.close()
    # 2 sets × 2 methods × (plain, weighted), and each task used alone at each scale below 1
    assert used and rows["ray"] == rows["local"]
    assert len(rows["ray"]) == len(jobs) == 2 * 2 * 2 + len(scales(spec)) * len(used)


# The pool's failure modes, on plain functions (no model): each must be one line, and quick. The setups and jobs
# are defined inside the tests so that Ray ships them by value (the workers cannot import this test module).


def _one_line_error(pool, job, payloads) -> str:
    try:
        with pytest.raises(MergeabilityError) as e:
            list(pool.map(job, payloads))
    finally:
        pool.close()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@RAY_TEST_TIMEOUT
def test_ray_pool_job_failure_is_one_line(local_ray):
    from mergeability.backends import RayPool

    def job(context, shared, payload):
        if payload == 3:
            raise ValueError(f"bad payload {payload}")
        return payload + shared

    pool = RayPool(lambda: None, 10, workers=2)
    assert sorted(pool.map(job, [0, 1, 2])) == [(0, 10), (1, 11), (2, 12)]
    msg = _one_line_error(pool, job, [0, 1, 2, 3])
    assert msg.startswith("Ray job 3 failed") and "ValueError: bad payload 3" in msg


@RAY_TEST_TIMEOUT
def test_ray_pool_dead_worker_is_one_line(local_ray):
    from mergeability.backends import RayPool

    def setup():
        raise MergeabilityError("cannot load the model")

    msg = _one_line_error(RayPool(setup, None, workers=1), lambda c, s, p: p, [0])
    assert "cannot load the model" in msg

    def job(context, shared, payload):
        os._exit(1)  # the worker process dies mid-job

    msg = _one_line_error(RayPool(lambda: None, None, workers=1), job, [0])
    assert msg.startswith("Ray job 0 failed") and "died" in msg


@RAY_TEST_TIMEOUT
def test_ray_pool_that_cannot_start_times_out(local_ray, monkeypatch):
    from mergeability.backends import RayPool

    monkeypatch.setenv("MERGEABILITY_RAY_TIMEOUT", "5")
    pool = RayPool(lambda: None, None, workers=1, cpus_per_worker=3)  # 3 CPUs on a 2-CPU cluster: never placed
    msg = _one_line_error(pool, lambda c, s, p: p, [0])
    assert msg.startswith("no Ray job finished in 5 s") and "CPU" in msg
