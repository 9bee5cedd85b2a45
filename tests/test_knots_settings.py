"""The knots-settings experiment (KnOTS density × λ grid) and its report section, on a tiny finished run."""

import json
import math
import shutil
import sqlite3

import pytest
import torch
from rich.console import Console

from conftest import cfg_for, run_cli
from mergeability import MergeabilityError, run
from mergeability.analysis.features import load_features
from mergeability.config import MergeConfig
from mergeability.estimate import Trial
from mergeability.experiments import EXPERIMENTS, get_experiment, run_experiment
from mergeability.experiments.context import open_context
from mergeability.experiments.knots_settings import KnotsSettings, setting_label, settings_key
from mergeability.merging import Knots, get_method
from mergeability.pipelines import run_examples
from mergeability.report.knots_settings import knots_settings_section, setting_scores
from mergeability.store import Store

QUIET = Console(quiet=True)
OTHERS = [(0.2, 0.5), (0.2, 1.0), (1.0, 0.5)]  # the default grid less the run's own setting (1.0, 1.0)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, dataset, tmp_path_factory):
    """(config, a finished run with no experiment, a copy of it with knots-settings run on it)."""
    root = tmp_path_factory.mktemp("knots-settings")
    cfg = cfg_for(tiny_model_dir, dataset)
    run_examples(cfg, root / "bare", console=QUIET)
    shutil.copytree(root / "bare", root / "run")
    run_experiment("knots-settings", root / "run", QUIET)
    return cfg, root / "bare", root / "run"


def trial_rows(run_dir) -> list[tuple]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        return db.execute("SELECT params, target, trial, method, partners, correct, probs FROM trials "
                          "ORDER BY params, target, trial").fetchall()
    finally:
        db.close()


def by_key(rows) -> dict[str, dict[tuple[str, int], tuple]]:
    out: dict[str, dict] = {}
    for key, target, trial, *rest in rows:
        out.setdefault(key, {})[(target, trial)] = tuple(rest)
    return out


class Killed(Exception):
    pass


def count_add_trial(monkeypatch, limit: int = 10**9) -> dict:
    """Count Store.add_trial calls; raise after `limit` of them (a killed experiment)."""
    orig, calls = Store.add_trial, {"n": 0}

    def wrapped(self, row):
        if calls["n"] >= limit:
            raise Killed
        calls["n"] += 1
        orig(self, row)

    monkeypatch.setattr(Store, "add_trial", wrapped)
    return calls


def test_registered_with_the_official_and_default_settings():
    exp = get_experiment("knots-settings")
    assert EXPERIMENTS["knots-settings"] is KnotsSettings and exp.name == "knots-settings" and exp.kind == "examples"
    assert exp.grid() == [(0.2, 0.5), (0.2, 1.0), (1.0, 0.5), (1.0, 1.0)]


@pytest.mark.parametrize("merge, skipped", [
    (MergeConfig(), (1.0, 1.0)),  # defaults filled in: {} is density 1.0, λ 1.0
    (MergeConfig(params={"lam": 1.0}), (1.0, 1.0)),
    (MergeConfig(params={"density": 0.2}), (0.2, 1.0)),
    (MergeConfig(params={"density": 1.0, "lam": 0.5}), (1.0, 0.5)),  # the official KnOTS setting
    (MergeConfig(params={"density": 1.0, "lam": 0.5, "inner": "mean"}), None),  # another KnOTS: nothing skipped
    (MergeConfig(method="ties"), None),
])
def test_only_the_runs_own_setting_is_skipped(merge, skipped):
    grid = KnotsSettings().grid()
    assert KnotsSettings().todo(merge) == [s for s in grid if s != skipped]


def test_writes_the_three_other_settings_with_the_runs_partners(runs):
    cfg, _, run_dir = runs
    M, N = cfg.merge.trials, cfg.merge.partners
    keys = by_key(trial_rows(run_dir))
    own = keys[run.run_key(cfg)]
    assert set(keys) == {run.run_key(cfg)} | {settings_key(d, lam, N) for d, lam in OTHERS}
    for d, lam in OTHERS:
        rows = keys[settings_key(d, lam, N)]
        assert len(rows) == len(own) == M * len(Store(run_dir / "results.sqlite", lock=False).kept_updates())
        assert {k: r[0] for k, r in rows.items()} == {k: "knots" for k in own}
        assert {k: r[1] for k, r in rows.items()} == {k: r[1] for k, r in own.items()}  # same seeds, same partners


def test_a_second_run_adds_nothing(runs, monkeypatch):
    _, _, run_dir = runs
    before = trial_rows(run_dir)
    calls = count_add_trial(monkeypatch)
    run_experiment("knots-settings", run_dir, QUIET)
    assert calls["n"] == 0 and trial_rows(run_dir) == before


def test_a_killed_experiment_resumes_without_redoing_work(runs, tmp_path, monkeypatch):
    cfg, bare, run_dir = runs
    out = tmp_path / "run"
    shutil.copytree(bare, out)
    with monkeypatch.context() as m:
        count_add_trial(m, limit=4)
        with pytest.raises(Killed):
            run_experiment("knots-settings", out, QUIET)
    calls = count_add_trial(monkeypatch)
    run_experiment("knots-settings", out, QUIET)
    kept = len(Store(out / "results.sqlite", lock=False).kept_updates())
    assert calls["n"] == len(OTHERS) * cfg.merge.trials * kept - 4
    got, want = trial_rows(out), trial_rows(run_dir)
    assert [r[:6] for r in got] == [r[:6] for r in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(json.loads(g[6]), json.loads(w[6]))) < 1e-6


def test_each_settings_trials_are_that_knots_merge(runs):
    """A trial of setting (d, λ): the merge its recorded parameters name has the ΔW of
    Knots(density=d, lam=λ).reference over the same members, and the recorded outcome is that merge's."""
    cfg, _, run_dir = runs
    keys = by_key(trial_rows(run_dir))
    ctx = open_context(run_dir, {})
    try:
        updates = run.load_kept(ctx.store, run_dir, set(Store(run_dir / "results.sqlite", lock=False).kept_updates()))
        evaluate = ctx.evaluator()
        deltas = {}
        for d, lam in OTHERS:
            key = settings_key(d, lam, cfg.merge.partners)
            (target, trial), (method, partners, correct, probs) = min(keys[key].items())
            members = [updates[target], *(updates[p] for p in json.loads(partners))]
            recorded = {k: v for k, v in json.loads(key).items() if k not in ("method", "partners")}
            fast = get_method(method, **recorded).merge(members)
            ref = Knots(density=d, lam=lam).reference(members)
            for name, mod in ref.modules.items():
                want = mod.delta().double()
                assert torch.allclose(fast.modules[name].delta().double(), want, atol=1e-5 * want.abs().max())
            deltas[d, lam] = ref.modules[name].delta()
            outcome, = evaluate([Trial(target, trial, tuple(json.loads(partners)))], [ref])
            assert outcome.correct == correct
            assert max(abs(a - b) for a, b in zip(outcome.detail, json.loads(probs))) < 1e-4
        assert not torch.allclose(deltas[0.2, 0.5], deltas[1.0, 0.5])  # the settings merge differently
    finally:
        ctx.store.close()


def test_report_section_tables_and_figure(runs, tmp_path):
    cfg, _, run_dir = runs
    M = cfg.merge.trials
    store = Store(run_dir / "results.sqlite", lock=False)
    main = run.example_scores(cfg, store)
    labels = [setting_label(d, lam) for d, lam in KnotsSettings().grid()]
    settings = setting_scores(cfg, store, sorted(main))
    assert list(settings) == labels and settings["d=1.0, λ=1.0"] == main
    sec = knots_settings_section(cfg, store, main, load_features(store, main), tmp_path)
    dist, corr = sec.tables
    assert dist.title == "Score distribution by KnOTS setting" and dist.columns == ["score", *labels]
    assert [r[0] for r in dist.rows] == [f"{k / M:.2f}" for k in range(M + 1)] + ["mean score", "share at 0",
                                                                                   "share at 1.0"]
    for j, label in enumerate(labels, 1):
        counts = [int(r[j]) for r in dist.rows[: M + 1]]
        assert sum(counts) == len(main)
        assert counts == [sum(round(s * M) == k for s in settings[label].values()) for k in range(M + 1)]
        assert math.isclose(float(dist.rows[M + 1][j]), sum(settings[label].values()) / len(main), abs_tol=1e-3)
    assert corr.title == "Correlations with the score under each KnOTS setting" and len(corr.columns) == 7
    assert [(r[0], r[1]) for r in corr.rows] == [(lb, f) for lb in labels for f in
                                                 ("base gap p(top) − p(gold)", "base p(gold)", "base rank of gold",
                                                  "post − base p(gold)")]
    assert len(sec.figures) == 1 and sec.figures[0][1].exists() and sec.claims == {}


def test_report_section_is_empty_without_other_settings(runs, tmp_path):
    cfg, bare, _ = runs
    store = Store(bare / "results.sqlite", lock=False)
    main = run.example_scores(cfg, store)
    sec = knots_settings_section(cfg, store, main, load_features(store, main), tmp_path)
    assert not sec.tables and not sec.figures and not sec.claims
    assert list(setting_scores(cfg, store, sorted(main))) == ["d=1.0, λ=1.0"]


@pytest.mark.parametrize("params, match", [
    (dict(densities=(0.0,)), "in \\(0, 1\\]"),
    (dict(densities=(0.2, 1.5)), "in \\(0, 1\\]"),
    (dict(densities=(math.nan,)), "in \\(0, 1\\]"),
    (dict(lams=(0,)), "positive"),
    (dict(lams=(-0.5,)), "positive"),
    (dict(lams=(math.inf,)), "positive"),
    (dict(densities=()), "at least one density"),
    (dict(lams=()), "at least one lam"),
    (dict(lams=("big",)), "must be numbers"),
])
def test_bad_grid_values(params, match):
    with pytest.raises(MergeabilityError, match=match) as e:
        KnotsSettings(**params)
    assert "\n" not in str(e.value)


def test_cli_on_a_non_run_directory(tmp_path, capsys):
    code, _, err = run_cli(["experiment", "knots-settings", tmp_path], capsys)
    assert code == 2 and err.startswith("error:") and "not a run directory" in err and err.count("\n") == 1, err
