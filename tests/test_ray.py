"""The Ray backend: the same study on a local Ray (2 CPUs) gives exactly the local backend's scores."""

import shutil
import sqlite3
import sys

import pytest
import ray  # part of the test extra: pip install -e .[test]
from rich.console import Console

from conftest import run_cli
from test_pipeline import cfg_for, dataset  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_backend_gives_identical_scores(tiny_model_dir, dataset, tmp_path, local_ray):  # noqa: F811
    from mergeability.experiments import run_experiment
    from mergeability.pipelines import run_examples

    quiet = Console(quiet=True)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2), tmp_path / "local", console=quiet)
    run_examples(cfg_for(tiny_model_dir, dataset, batch_rows=2, backend="ray", workers=2), tmp_path / "ray", console=quiet)
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


def test_ray_backend_without_ray_says_how_to_install(tiny_model_dir, dataset, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20",
                            "--partners", "2", "--backend", "ray", "--out", out], capsys)
    assert code == 2 and "pip install 'mergeability[ray]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_ray_backend_task_run_is_identical(tiny_model_dir, tmp_path, local_ray):
    from test_task_pipeline import cfg_for as task_cfg
    from test_task_pipeline import make_pool

    from mergeability.pipelines import run_tasks

    pool = make_pool(tmp_path / "pool", tiny_model_dir, n_weak=4)
    quiet = Console(quiet=True)
    run_tasks(task_cfg(tiny_model_dir, pool), tmp_path / "local", console=quiet)
    run_tasks(task_cfg(tiny_model_dir, pool, backend="ray", workers=2), tmp_path / "ray", console=quiet)
    assert (tmp_path / "ray" / "scores.csv").read_bytes() == (tmp_path / "local" / "scores.csv").read_bytes()
    q = "SELECT target, trial, partners, correct, probs FROM trials ORDER BY target, trial"
    rows = {d: sqlite3.connect(tmp_path / d / "results.sqlite").execute(q).fetchall() for d in ("local", "ray")}
    assert rows["ray"] == rows["local"] and len(rows["ray"]) == 4 * 3


def test_ray_backend_weighted_experiment_is_identical(tiny_model_dir, tmp_path, local_ray, monkeypatch):
    from test_task_pipeline import cfg_for as task_cfg

    from mergeability import backends
    from test_task_pipeline import make_pool

    from mergeability.pipelines import run_tasks
    from mergeability.store import Store
    from mergeability.experiments import Weighted, run_experiment

    pool = make_pool(tmp_path / "pool", tiny_model_dir, n_weak=3, n_strong=3)
    quiet = Console(quiet=True)
    run_tasks(task_cfg(tiny_model_dir, pool, trials=1, partners=1), tmp_path / "run", console=quiet)
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
        rows[backend] = store.experiment_rows("weighted")
        store.close()
    assert rows["ray"] == rows["local"] and len(rows["ray"]) == len(jobs) == 2 * 2 * 2
