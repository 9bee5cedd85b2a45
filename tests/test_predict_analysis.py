"""analysis/predict.py on synthetic data whose structure decides the answer: a feature that only identifies the
group must not pass for a predictor under grouped cross-validation (while ungrouped KFold is fooled by it), a real
monotone signal is recovered whatever its sign, pure noise is not, and the CI resamples whole groups."""

import json
import math

import numpy as np
import pytest
from sklearn.model_selection import KFold

from mergeability.analysis.predict import (
    LOST,
    MIN_GROUPS,
    MIN_ROWS,
    boosting_model,
    calibration,
    compare,
    evaluate,
    fit_final,
    grouped_splits,
    importances,
    linear_model,
    oof_predictions,
    single_feature,
    spearman,
)
from mergeability.errors import MergeabilityError


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def group_labels(groups: int, per: int) -> np.ndarray:
    return np.repeat([f"rel{i}" for i in range(groups)], per)


def monotone(seed=0, groups=10, per=15, noise=0.05):
    """A shared signal: y = sigmoid(2x) + noise in every group, no group effect."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.5, groups * per)
    y = np.clip(sigmoid(2 * x) + rng.normal(0, noise, len(x)), 0, 1)
    return x, y, group_labels(groups, per)


def group_effects(seed=0, groups=40, per=12):
    """y = the group's random effect + a little noise; the only feature is the group's id (one-hot and as a
    number), which says nothing about an unseen group."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    y = sigmoid(rng.normal(0, 1.5, groups)[g] + rng.normal(0, 0.2, len(g)))
    X = np.column_stack([g.astype(float), np.eye(groups)[g]])
    return X, y, g


# ------------------------------------------------------------------ folds


def test_grouped_splits_keep_groups_apart_and_test_every_row_once():
    g = group_labels(9, 4)
    splits = grouped_splits(g, n_splits=5)
    assert len(splits) == 5
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(len(g)))
    for train, test in splits:
        assert not set(g[train]) & set(g[test])


def test_few_groups_leave_one_group_out():
    g = group_labels(4, 5)
    splits = grouped_splits(g, n_splits=5)
    assert len(splits) == 4
    assert all(len(set(g[test])) == 1 for _, test in splits)


@pytest.mark.parametrize("rows, groups", [(MIN_ROWS - 1, 5), (30, MIN_GROUPS - 1)])
def test_too_few_rows_or_groups_is_a_one_line_error(rows, groups):
    g = np.arange(rows) % groups
    with pytest.raises(MergeabilityError, match=r"--resume the run") as e:
        grouped_splits(g)
    assert "\n" not in str(e.value) and f"{rows} scored rows in {groups} groups" in str(e.value)


def test_unscored_rows_are_neither_fitted_nor_counted():
    x, y, g = monotone(groups=4, per=4)
    y = y.copy()
    y[:5] = np.nan  # 11 scored rows: too few
    with pytest.raises(MergeabilityError, match="11 scored rows"):
        single_feature(x, y, g)
    x, y, g = monotone()
    y = y.copy()
    y[::7] = np.nan
    pred = oof_predictions(linear_model, x, y, g)
    assert np.isnan(pred[::7]).all() and np.isfinite(np.delete(pred, np.s_[::7])).all()
    assert evaluate("linear", "model", pred, y, g).n == np.isfinite(y).sum()


# ------------------------------------------------------------------ a leak that grouping must not reward


def kfold_oof(make_model, X, y):
    """Out-of-fold predictions of plain, shuffled KFold: what the module must not do."""
    out = np.empty(len(y))
    for train, test in KFold(5, shuffle=True, random_state=0).split(X):
        out[test] = make_model().fit(X[train], y[train]).predict(X[test])
    return out


@pytest.mark.parametrize("make_model", [linear_model, boosting_model], ids=["linear", "boosting"])
def test_group_identity_does_not_pass_for_a_predictor(make_model):
    X, y, g = group_effects()
    grouped = evaluate("m", "model", oof_predictions(make_model, X, y, g), y, g, n_boot=300)
    ungrouped = spearman(kfold_oof(make_model, X, y), y)
    assert ungrouped > 0.8  # the contrast: row-level folds let the model look the group's score up
    # No evidence of a positive ρ. Not "ρ ≈ 0": a model that learns nothing predicts about its training mean,
    # which is high exactly when the held-out groups are low, so pooled out-of-fold ρ of a lookup runs negative.
    assert grouped.rho < 0.3 and grouped.ci[0] < 0


# ------------------------------------------------------------------ a real signal, its sign, and noise


def test_monotone_signal_is_recovered_by_models_and_baselines():
    x, y, g = monotone()
    noise = np.random.default_rng(1).normal(size=len(x))
    evals = {e.name: e for e in compare({"signal": x, "reversed": -x, "noise": noise}, y, g, seed=0)}
    for name in ("linear", "boosting", "signal", "reversed"):
        e = evals[name]
        assert e.rho > 0.8 and e.ci[0] > 0, name
        assert e.auc_lost > 0.9 and e.auc_survives > 0.9, name
        assert (e.n, e.groups) == (len(y), 10)
    assert abs(evals["noise"].rho) < 0.3


def test_single_feature_learns_its_sign_and_imputes_missing_values():
    x, y, g = monotone()
    x = x.copy()
    x[::5] = np.nan
    pred = single_feature(-x, y, g)
    assert np.isfinite(pred).all()
    known = ~np.isnan(x)
    assert spearman(pred[known], y[known]) > 0.9


def test_compare_order_skips_uninformative_features_and_checks_baselines():
    x, y, g = monotone(groups=6, per=10)
    rng = np.random.default_rng(2)
    feats = {"noise": rng.normal(size=len(x)), "signal": x, "empty": np.full(len(x), np.nan),
             "const": np.ones(len(x))}
    evals = compare(feats, y, g)
    assert [e.name for e in evals] == ["linear", "boosting", "signal", "noise"]
    assert [e.kind for e in evals] == ["model", "model", "feature", "feature"]
    assert [e.name for e in compare(feats, y, g, baselines=["noise"])][2:] == ["noise"]
    with pytest.raises(MergeabilityError, match="unknown baseline feature"):
        compare(feats, y, g, baselines=["gap"])
    row = json.loads(json.dumps(evals[0].row(), allow_nan=False))
    assert "predictions" not in row and row["name"] == "linear" and row["ci"] == list(evals[0].ci)


# ------------------------------------------------------------------ metrics


def test_auc_is_nan_without_a_lost_row():
    x, y, g = monotone()
    y = np.clip(y, LOST + 0.01, 1)
    e = evaluate("signal", "feature", single_feature(x, y, g), y, g, n_boot=100)
    assert math.isnan(e.auc_lost) and e.auc_survives > 0.9
    assert e.row()["auc_lost"] is None


def test_calibration_is_monotone_and_counts_every_scored_row():
    x, y, g = monotone(per=20)
    pred = oof_predictions(linear_model, x, y, g)
    pred[0] = np.nan
    table = calibration(pred, y, bins=5)
    assert len(table) == 5 and sum(r["n"] for r in table) == len(y) - 1
    assert np.all(np.diff([r["pred"] for r in table]) > 0)
    assert np.all(np.diff([r["score"] for r in table]) > 0)


def test_ci_resamples_whole_groups():
    """Six groups whose shared effect drives both prediction and score: 180 rows, but six units of evidence. A
    row bootstrap would call ρ precise; the cluster bootstrap must be much wider."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(6), 30)
    effect = rng.normal(0, 1, 6)[g]
    pred, y = effect + rng.normal(0, 0.3, len(g)), effect + rng.normal(0, 0.3, len(g))
    e = evaluate("p", "feature", pred, y, g, n_boot=500)
    rows = rng.integers(0, len(g), (500, len(g)))
    row_boot = np.quantile([spearman(pred[r], y[r]) for r in rows], [0.025, 0.975])
    assert e.ci[0] <= e.rho <= e.ci[1]
    assert e.ci[1] - e.ci[0] > 2 * (row_boot[1] - row_boot[0])


def test_importances_and_final_fit():
    x, y, g = monotone()
    noise = np.random.default_rng(4).normal(size=len(x))
    X = np.column_stack([x, noise])
    imp = importances(linear_model, X, y, ["signal", "noise"], n_repeats=5)
    assert imp["signal"] > 0.5 and abs(imp["noise"]) < 0.05
    model = fit_final(linear_model, X, y)
    assert spearman(model.predict(X), y) > 0.9
