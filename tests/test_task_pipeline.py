"""`run tasks` end to end on a tiny model and a local pool, its resume and its bad input (the weighted experiment on
such a run: tests/test_weighted.py)."""

import json
import sqlite3

import pytest
from rich.console import Console

from conftest import make_pool, random_update, run_cli, write_rows
from conftest import task_cfg_for as cfg_for
from mergeability.pipelines import run_tasks
from mergeability.store import Store

QUIET = Console(quiet=True)
@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model_dir):
    return make_pool(tmp_path_factory.mktemp("pool"), tiny_model_dir, n_weak=5)


def test_task_run_scores_resumes_and_reports(tiny_model_dir, pool, tmp_path):
    from mergeability.report.build import build_report

    out = tmp_path / "run"
    s = run_tasks(cfg_for(tiny_model_dir, pool), out, console=QUIET)
    assert s["tasks"] == 5 and s["kept"] == 5
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT base_acc, ft_acc, n_test, fro_norm FROM tasks").fetchall()
    assert all(b == 0.0 and f > 0.5 and n == 16 and w > 0 for b, f, n, w in rows)  # the adapters learned their task
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 5 * 3
    acc, probs = db.execute("SELECT correct, probs FROM trials LIMIT 1").fetchone()
    assert acc == sum(json.loads(probs)) / 16  # a trial records the accuracy and each example's correctness
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("task,score,degradation,base_acc,ft_acc") and len(lines) == 6
    before = (out / "scores.csv").read_bytes()
    run_tasks(cfg_for(tiny_model_dir, pool), out, resume=True, console=QUIET)
    assert (out / "scores.csv").read_bytes() == before
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 5 * 3
    html, claims = build_report(out)
    assert html.exists() and "Fig. 4" in html.read_text() and len(claims) == 8


def test_killed_task_run_resumes_to_the_same_scores(tiny_model_dir, pool, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run_tasks(cfg_for(tiny_model_dir, pool), ref, console=QUIET)
    out = tmp_path / "killed"
    for method, n in (("add_task", 2), ("add_trial", 4)):
        orig = getattr(Store, method)
        calls = {"n": 0}

        def wrapped(self, row, orig=orig, calls=calls, n=n):
            if calls["n"] >= n:
                raise KeyboardInterrupt
            calls["n"] += 1
            orig(self, row)

        monkeypatch.setattr(Store, method, wrapped)
        with pytest.raises(KeyboardInterrupt):
            run_tasks(cfg_for(tiny_model_dir, pool), out, resume=True, console=QUIET)
        monkeypatch.setattr(Store, method, orig)
    run_tasks(cfg_for(tiny_model_dir, pool), out, resume=True, console=QUIET)
    assert (out / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()


def test_threshold_sweep_scores_each_distinct_pool(tiny_model_dir, pool, tmp_path):
    out = tmp_path / "sweep"
    run_tasks(cfg_for(tiny_model_dir, pool, threshold=0.0, sweep=[0.5, 1.0, 0.0], trials=1), out, console=QUIET)
    db = sqlite3.connect(out / "results.sqlite")
    pools = json.loads(db.execute("SELECT value FROM meta WHERE key = 'pools'").fetchone()[0])
    ft = dict(db.execute("SELECT name, ft_acc FROM tasks").fetchall())
    for th, names in pools.items():
        assert names == sorted(n for n, a in ft.items() if a >= float(th))
    assert len({tuple(v) for v in pools.values()}) == len(pools)  # an identical pool is not scored twice
    keys = db.execute("SELECT COUNT(DISTINCT params) FROM trials").fetchone()[0]
    assert keys == len(pools)


def test_bad_task_input_is_one_line_and_writes_nothing(tiny_model_dir, pool, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    make_pool(foreign, tiny_model_dir, n_weak=3)
    from mergeability.updates import save_update

    upd = random_update({"model.layers.0.self_attn.q_proj": (32, 32)}, 2, base="mistralai/Mistral-7B-Instruct-v0.2")
    save_update(upd, foreign / "adapters" / "Mistral-7B-Instruct-v0.2-4b-r16-task1")
    no_test = tmp_path / "no_test"
    write_rows(no_test / "datasets" / "task001_a" / "train.jsonl", [{"input": "w1", "output": "w2"}])
    cases = [
        (["--pool", foreign], "targets mistralai/Mistral-7B-Instruct-v0.2"),
        (["--pool", no_test], "task001_a has no test split"),
        (["--pool", tmp_path / "missing"], "unknown task pool"),
        (["--pool", pool, "--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["--pool", pool, "--partners", "9"], "--partners 9 is larger than the pool"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, _, err = run_cli(["run", "tasks", "--model", tiny_model_dir, "--out", out, *args], capsys)
        assert code == 2 and message in err and err.startswith("error:") and err.count("\n") == 1, err
        assert not out.exists()


def test_empty_pool_after_threshold_is_an_error(tiny_model_dir, tmp_path, capsys):
    from mergeability.updates import save_update

    root = make_pool(tmp_path / "pool", tiny_model_dir, n_weak=3)
    shapes = {f"model.layers.{i}.self_attn.{m}": (32 if m == "q_proj" else 16, 32) for i in range(2)
              for m in ("q_proj", "k_proj", "v_proj")}
    for k in range(3):  # random adapters: they do not solve their tasks
        upd = random_update(shapes, 2, seed=k, base=str(tiny_model_dir), dtype=__import__("torch").float32)
        save_update(upd, root / "adapters" / f"adapter-task{k + 1}")
    out = tmp_path / "out"
    code, _, err = run_cli(["run", "tasks", "--model", tiny_model_dir, "--pool", root, "--out", out,
                            "--threshold", "0.9", "--partners", "1"], capsys)
    assert code == 2 and "no task reaches fine-tuned accuracy 0.9" in err and err.count("\n") == 1
    assert not (out / "scores.csv").exists() and not list(out.glob("*.tmp"))
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 3  # finished work is kept for --resume
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0


def test_temperature_must_be_positive(tiny_model_dir, pool, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    from mergeability.updates import save_update

    for i, p in enumerate((a, b)):
        u = random_update({"model.layers.0.self_attn.q_proj": (32, 32)}, 2, seed=i, base=str(tiny_model_dir))
        save_update(u, p)
    test = pool / "datasets" / "task001_weak" / "test.jsonl"
    code, _, err = run_cli(["merge", a, b, "--out", tmp_path / "m", "--weights", "base-accuracy", "--eval", test,
                            "--eval", test, "--temperature", "0"], capsys)
    assert code == 2 and "temperature must be > 0" in err and not (tmp_path / "m").exists()
    code, _, err = run_cli(["merge", a, b, "--out", tmp_path / "m", "--weights", "base-accuracy"], capsys)
    assert code == 2 and "needs --eval" in err
    code, _, err = run_cli(["experiment", "weighted", tmp_path, "--temperature", "-1"], capsys)
    assert code == 2 and "temperatures must be > 0" in err


def test_merge_with_base_accuracy_weights_evaluates(tiny_model_dir, pool, tmp_path, capsys):
    from mergeability import load_update

    run_dir = tmp_path / "run"
    run_tasks(cfg_for(tiny_model_dir, pool, trials=1, partners=1), run_dir, console=QUIET)
    adapters = [run_dir / "updates" / n for n in ("task001_weak", "task002_weak")]
    evals = [pool / "datasets" / n / "test.jsonl" for n in ("task001_weak", "task002_weak")]
    code, out, err = run_cli(["merge", *adapters, "--out", tmp_path / "m", "--method", "mean", "--weights",
                              "base-accuracy", "--eval", evals[0], "--eval", evals[1], "--temperature", "0.5"], capsys)
    assert code == 0, err
    assert "fine-tuned" in out and "task001_weak" in out
    merged = load_update(tmp_path / "m")
    assert merged.meta["merge"]["base_accuracy"] == [0.0, 0.0]
    assert merged.meta["merge"]["weights"] == pytest.approx([0.5, 0.5])
