"""Predicting mergeability scores from cheap features, measured honestly (issue #16).

Every prediction that is scored is out of fold, and folds are grouped (by relation at the example level, by task
family at the task level): a model never sees a row of the group it is scored on, so a feature that merely
identifies the group (and through it the group's typical score) cannot pass for a predictor. ρ's CI resamples
whole groups for the same reason. Baselines (each feature alone) learn their orientation inside the folds too.
Pure numpy / SciPy / scikit-learn; rows whose score is NaN (not scored yet) are neither fitted nor evaluated and
get NaN predictions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from scipy import stats as st
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import RidgeCV
from sklearn.metrics import make_scorer, roc_auc_score
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from mergeability.analysis.inference import cluster_bootstrap
from mergeability.atomic import jsonable
from mergeability.errors import MergeabilityError

LOST, SURVIVES = 0.2, 0.8  # score ≤ LOST is "lost", ≥ SURVIVES "survives" (issue #16)
MIN_ROWS, MIN_GROUPS = 12, 3  # fewer scored rows / groups cannot be cross-validated

Splits = list[tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------ metrics


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ (Pearson r of the ranks, ties averaged); NaN when either side has no spread. Ranked here rather
    than through `scipy.stats.spearmanr` because the bootstrap calls it a thousand times per evaluation."""
    a, b = st.rankdata(a), st.rankdata(b)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else math.nan


def _auc(labels: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the 0/1 `labels`; NaN when one class is absent (there is nothing to separate)."""
    return float(roc_auc_score(labels, score)) if 0 < labels.sum() < len(labels) else math.nan


@dataclass(frozen=True)
class Evaluation:
    name: str  # "linear", "boosting", or the baseline feature's name
    kind: str  # "model" | "feature"
    rho: float  # Spearman ρ of out-of-fold predictions vs scores
    ci: tuple[float, float]  # 95 % CI, cluster bootstrap over groups (rows of a group resampled together)
    auc_lost: float  # AUC of −prediction for score ≤ LOST; NaN where a class is absent
    auc_survives: float  # AUC of prediction for score ≥ SURVIVES; NaN where a class is absent
    n: int  # rows evaluated (scored, with a prediction)
    groups: int  # groups among them
    predictions: np.ndarray = field(repr=False)  # out-of-fold, aligned with the input rows

    def row(self) -> dict:
        """Everything but the predictions, as strict JSON takes it: NaN as None, which a table prints as missing."""
        return jsonable({"name": self.name, "kind": self.kind, "rho": self.rho, "ci": self.ci,
                         "auc_lost": self.auc_lost, "auc_survives": self.auc_survives, "n": self.n,
                         "groups": self.groups})


def evaluate(name: str, kind: str, pred, y, groups, *, seed: int = 0, n_boot: int = 1000) -> Evaluation:
    """ρ, its group-bootstrap CI and the two AUCs of predictions `pred` against measured scores `y`, over the rows
    where both are known."""
    p, s, g = np.asarray(pred, dtype=float), np.asarray(y, dtype=float), np.asarray(groups)
    ok = ~(np.isnan(p) | np.isnan(s))
    p, s, g = p[ok], s[ok], g[ok]
    if not len(p):
        return Evaluation(name, kind, math.nan, (math.nan, math.nan), math.nan, math.nan, 0, 0,
                          np.asarray(pred, dtype=float))
    ci = cluster_bootstrap(lambda rows: spearman(p[rows], s[rows]), g, n=n_boot, seed=seed)
    return Evaluation(name, kind, spearman(p, s), ci,
                      _auc((s <= LOST).astype(int), -p), _auc((s >= SURVIVES).astype(int), p),
                      len(p), len(np.unique(g)), np.asarray(pred, dtype=float))


# ------------------------------------------------------------------ folds and models


def grouped_splits(groups, n_splits: int = 5) -> Splits:
    """(train, test) row indices of GroupKFold with min(n_splits, #groups) folds: LeaveOneGroupOut when there are
    no more groups than folds. A test fold never shares a group with its training fold."""
    g = np.asarray(groups)
    k = len(np.unique(g))
    if len(g) < MIN_ROWS or k < MIN_GROUPS:
        raise MergeabilityError(
            f"cannot cross-validate a predictor on {len(g)} scored rows in {k} groups: it needs at least "
            f"{MIN_ROWS} rows and {MIN_GROUPS} groups; run more items / tasks, or --resume the run")
    cv = LeaveOneGroupOut() if k <= n_splits else GroupKFold(n_splits=n_splits)
    return list(cv.split(np.zeros((len(g), 1)), groups=g))


def linear_model() -> Pipeline:
    """Ridge on standardised, median-imputed features; α chosen by (efficient leave-one-out) CV on the training
    rows only. An all-NaN column is kept (as zeros) so that columns keep their meaning across folds."""
    return Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                     ("scale", StandardScaler()),
                     ("ridge", RidgeCV(alphas=np.logspace(-3, 3, 13)))])


class EmptyAsZero(TransformerMixin, BaseEstimator):
    """Columns with no known value in the training rows become zeros (a constant, which trees ignore). Gradient
    boosting handles NaN itself but fails on a column that is NaN throughout (its binning has nothing to bin), and
    a feature can be missing for every training row of a fold."""

    def fit(self, X, y=None):
        self.empty_ = np.isnan(np.asarray(X, dtype=float)).all(0)
        return self

    def transform(self, X):
        out = np.array(X, dtype=float)
        out[:, self.empty_] = 0.0
        return out


def boosting_model(seed: int = 0) -> Pipeline:
    """Small, regularised gradient boosting: runs have tens to hundreds of rows, so shallow trees, a slow rate and
    large leaves keep it from memorising them. Handles NaN features itself, all-NaN ones through `EmptyAsZero`."""
    return Pipeline([("empty", EmptyAsZero()),
                     ("boost", HistGradientBoostingRegressor(max_depth=3, learning_rate=0.05, max_iter=200,
                                                             min_samples_leaf=10, l2_regularization=1.0,
                                                             random_state=seed))])


def _matrix(X) -> np.ndarray:
    a = np.asarray(X, dtype=float)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def _out_of_fold(fit_predict: Callable, X: np.ndarray, y, groups, n_splits: int) -> np.ndarray:
    """Out-of-fold predictions of `fit_predict(X_train, y_train, X_test)` over grouped folds of the scored rows;
    NaN for unscored rows."""
    s, g = np.asarray(y, dtype=float), np.asarray(groups)
    scored = np.flatnonzero(~np.isnan(s))
    out = np.full(len(s), math.nan)
    for train, test in grouped_splits(g[scored], n_splits):
        tr, te = scored[train], scored[test]
        out[te] = fit_predict(X[tr], s[tr], X[te])
    return out


def _fit_model(make_model: Callable, X_train, y_train, X_test) -> np.ndarray:
    return make_model().fit(X_train, y_train).predict(X_test)


def oof_predictions(make_model: Callable, X: np.ndarray, y, groups, n_splits: int = 5) -> np.ndarray:
    """Out-of-fold predictions of a fresh `make_model()` per grouped fold, aligned with the rows of X."""
    return _out_of_fold(partial(_fit_model, make_model), _matrix(X), y, groups, n_splits)


def _fit_line(X_train, y_train, X_test) -> np.ndarray:
    """Least-squares line of y on one feature, fitted on the training rows where the feature is known (its sign is
    learned here, not chosen with hindsight); a test row without the feature, or a feature with no spread in
    training, gets the training mean of y."""
    x, t = X_train[:, 0], X_test[:, 0]
    known = ~np.isnan(x)
    if known.sum() < 2 or np.ptp(x[known]) == 0:
        return np.full(len(t), float(y_train.mean()))
    xk, yk = x[known], y_train[known]
    slope = float((xk - xk.mean()) @ (yk - yk.mean()) / ((xk - xk.mean()) @ (xk - xk.mean())))
    # at the feature's training mean the line passes through the mean of y: imputing the mean x gives mean y
    return np.where(np.isnan(t), float(yk.mean()), yk.mean() + slope * (t - xk.mean()))


def single_feature(x, y, groups, n_splits: int = 5) -> np.ndarray:
    """Out-of-fold predictions of a one-feature linear model (a baseline such as the paper's gap)."""
    return _out_of_fold(_fit_line, _matrix(x), y, groups, n_splits)


# ------------------------------------------------------------------ comparing predictors


def _informative(x: np.ndarray) -> bool:
    """A feature that can rank anything: some values known, and not all equal."""
    known = x[~np.isnan(x)]
    return len(known) > 0 and np.ptp(known) > 0


def _order(e: Evaluation) -> tuple:
    """Models first (in the order run), then features by ρ descending, an undefined ρ last."""
    return (0, 0.0) if e.kind == "model" else (1, math.inf if math.isnan(e.rho) else -e.rho)


def compare(features: dict[str, np.ndarray], y, groups, *, baselines: Sequence[str] | None = None, seed: int = 0,
            n_splits: int = 5) -> list[Evaluation]:
    """"linear" and "boosting" on every feature (columns in the dict's order), then each feature in `baselines`
    (default: all) alone. Features that are all NaN or constant are not evaluated alone (nothing to rank by); the
    caller reports which are missing."""
    if not features:
        raise MergeabilityError("no features to predict mergeability scores from; pass at least one feature")
    names = list(features)
    unknown = sorted(set(baselines or ()) - set(names))
    if unknown:
        raise MergeabilityError(f"unknown baseline feature(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    cols = {k: np.asarray(v, dtype=float) for k, v in features.items()}
    X = np.column_stack([cols[k] for k in names])
    ev = partial(evaluate, y=y, groups=groups, seed=seed)
    out = [ev("linear", "model", oof_predictions(linear_model, X, y, groups, n_splits)),
           ev("boosting", "model", oof_predictions(partial(boosting_model, seed), X, y, groups, n_splits))]
    for k in names if baselines is None else baselines:
        if _informative(cols[k]):
            out.append(ev(k, "feature", single_feature(cols[k], y, groups, n_splits)))
    return sorted(out, key=_order)


def _rho_score(y_true, y_pred) -> float:
    """ρ as a scorer: a constant prediction ranks nothing, so it scores 0 rather than NaN."""
    r = spearman(np.asarray(y_true), np.asarray(y_pred))
    return 0.0 if math.isnan(r) else r


def _scored(X, y) -> tuple[np.ndarray, np.ndarray]:
    a, s = _matrix(X), np.asarray(y, dtype=float)
    keep = ~np.isnan(s)
    return a[keep], s[keep]


def fit_final(make_model: Callable, X, y):
    """The model fitted on every scored row: what a run saves to predict new updates."""
    a, s = _scored(X, y)
    return make_model().fit(a, s)


def importances(make_model: Callable, X, y, names: Sequence[str], *, seed: int = 0,
                n_repeats: int = 10) -> dict[str, float]:
    """Mean drop of ρ when one feature's column is permuted, for the model fitted on every scored row. In-sample:
    it says what the fitted model leans on, not how well it generalises (that is `compare`'s job)."""
    a, s = _scored(X, y)
    model = make_model().fit(a, s)
    r = permutation_importance(model, a, s, scoring=make_scorer(_rho_score), n_repeats=n_repeats, random_state=seed)
    return {k: float(v) for k, v in zip(names, r.importances_mean)}


def calibration(pred, y, bins: int = 5) -> list[dict]:
    """Equal-count bins of the prediction (rows with both known): mean prediction, mean measured score, rows."""
    p, s = np.asarray(pred, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(p) | np.isnan(s))
    p, s = p[ok], s[ok]
    chunks = np.array_split(np.argsort(p, kind="stable"), min(bins, len(p))) if len(p) else []
    return [{"pred": float(p[c].mean()), "score": float(s[c].mean()), "n": len(c)} for c in chunks]
