"""Inference that respects the design: rank correlation within strata (so a shared confound such as the relation
cannot manufacture a correlation), multiplicity correction, cluster bootstrap (repeated rows of one unit are not
independent evidence), power of a Spearman test, a repeated-measures permutation test (labels permuted within
block), and a clustered trend with an equivalence check. Pure functions of their numbers, deterministic under
`seed`, known-answer tested."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

NAN_CI = (math.nan, math.nan)


# ------------------------------------------------------------------ stratified Spearman


@dataclass(frozen=True)
class Stratified:
    rho: float  # within-stratum Spearman ρ, averaged with weights = stratum sizes
    p: float  # two-sided permutation p-value, y permuted within each stratum
    ci: tuple[float, float]  # 95 % percentile CI of a bootstrap that resamples pairs within each stratum
    n: int  # pairs used (complete pairs in the strata used)
    strata: int  # strata used (≥ 3 complete pairs and spread in both x and y)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of `a` with the same row of `b` (of ranks: Spearman ρ); NaN where a row has no spread."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    num, den = (a * b).sum(-1), np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.divide(num, den, out=np.full(np.shape(num), math.nan), where=den > 0)


def _usable_strata(x: np.ndarray, y: np.ndarray, strata: Sequence | None) -> list[np.ndarray]:
    """Row indices of each stratum that can carry a rank correlation: ≥ 3 complete pairs and spread in x and y."""
    labels = np.zeros(len(x), dtype=int) if strata is None else np.asarray(strata)
    if len(labels) != len(x) or len(y) != len(x):
        raise ValueError(f"x, y and strata differ in length: {len(x)}, {len(y)}, {len(labels)}")
    complete = np.flatnonzero(~(np.isnan(x) | np.isnan(y)))
    _, inverse = np.unique(labels[complete], return_inverse=True)
    groups = [complete[inverse == s] for s in range(inverse.max() + 1)] if len(complete) else []
    return [g for g in groups if len(g) >= 3 and np.ptp(x[g]) > 0 and np.ptp(y[g]) > 0]


def _permuted_rhos(x: np.ndarray, y: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """ρ of x with n_perm permutations of y. Permuting y only permutes its ranks, so y is ranked once, not per row."""
    ry = np.tile(st.rankdata(y), (n_perm, 1))
    return _row_pearson(st.rankdata(x)[None, :], rng.permuted(ry, axis=1))


def _bootstrap_rhos(x: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """ρ of n_boot resamples of the pairs; a resample repeats values, so each row is re-ranked (all rows at once)."""
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    return _row_pearson(st.rankdata(x[idx], axis=1), st.rankdata(y[idx], axis=1))


def _weighted_rows(rhos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise weighted mean over strata, skipping a stratum whose resample had no spread (renormalised weights)."""
    ok = ~np.isnan(rhos)
    total = (weights * ok).sum(1)
    num = np.where(ok, rhos, 0.0) @ weights
    return np.divide(num, total, out=np.full(len(num), math.nan), where=total > 0)


def stratified_spearman(x: Sequence[float], y: Sequence[float], strata: Sequence | None = None, *,
                        n_perm: int = 2000, n_boot: int = 1000, seed: int = 0) -> Stratified:
    """Spearman ρ within each stratum, combined as the size-weighted mean. A variable that shifts both x and y
    between strata (e.g. the relation) inflates a pooled ρ; within strata it cannot. The permutation null permutes y
    within each stratum, so it keeps the stratum structure; p = (1 + #{|ρ_perm| ≥ |ρ_obs|}) / (1 + n_perm)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    groups = _usable_strata(a, b, strata)
    n = sum(len(g) for g in groups)
    if not groups:
        return Stratified(math.nan, math.nan, NAN_CI, n, 0)
    weights = np.array([len(g) for g in groups], dtype=float) / n
    perm_rng, boot_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    obs = float(sum(w * _row_pearson(st.rankdata(a[g]), st.rankdata(b[g])) for w, g in zip(weights, groups)))
    perm = np.column_stack([_permuted_rhos(a[g], b[g], n_perm, perm_rng) for g in groups]) @ weights
    # a tolerance so that permutations tying the observed ρ exactly are not lost to rounding
    p = (1 + int((np.abs(perm) >= abs(obs) - 1e-12).sum())) / (1 + n_perm)
    boots = _weighted_rows(np.column_stack([_bootstrap_rhos(a[g], b[g], n_boot, boot_rng) for g in groups]), weights)
    boots = boots[~np.isnan(boots)]
    ci = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if len(boots) else NAN_CI
    return Stratified(obs, float(p), ci, n, len(groups))


# ------------------------------------------------------------------ multiplicity


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in input order: the j-th smallest of m is multiplied by m − j + 1, made
    monotone by a running maximum (so rejecting adj ≤ α is the step-down procedure) and capped at 1. NaN entries
    are no test: they pass through and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out.tolist()


# ------------------------------------------------------------------ cluster bootstrap


def _cluster_rows(draw: np.ndarray, starts: np.ndarray, counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Row indices of the drawn clusters, every row of a drawn cluster once per draw, without a Python loop."""
    lengths = counts[draw]
    ends = np.cumsum(lengths)
    return order[np.arange(ends[-1]) + np.repeat(starts[draw] - (ends - lengths), lengths)]


def cluster_bootstrap(fn: Callable[[np.ndarray], float], clusters: Sequence, *, n: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `fn(rows)` when whole clusters are resampled with replacement. Rows of one unit (repeats of
    one fixed update) are not independent, so the unit, not the row, is what varies from sample to sample. Draws
    where `fn` is NaN (e.g. no spread) are skipped. NaN for fewer than two clusters."""
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    k = int(inverse.max()) + 1 if len(inverse) else 0
    if k < 2:
        return NAN_CI
    order = np.argsort(inverse, kind="stable")  # rows grouped by cluster
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    draws = np.random.default_rng(seed).integers(0, k, (n, k))
    values = np.array([fn(_cluster_rows(d, starts, counts, order)) for d in draws], dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return NAN_CI
    a = (1 - level) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def cluster_bootstrap_ci(values: Sequence[float], clusters: Sequence, stat: Callable = np.mean, *, n: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """`stats.bootstrap_ci` with whole clusters resampled: `stat` of the values of the drawn clusters' rows."""
    v = np.asarray(values, dtype=float)
    return cluster_bootstrap(lambda rows: float(stat(v[rows])), clusters, n=n, seed=seed, level=level)


# ------------------------------------------------------------------ power of a Spearman test


def _noncentrality(rho: float, n: float) -> float:
    """|atanh ρ| in units of the Bonett–Wright standard error of Fisher's z for Spearman, √((1 + ρ²/2)/(n − 3))."""
    if not abs(rho) < 1:
        raise ValueError(f"|rho| must be below 1, got {rho}")
    return abs(math.atanh(rho)) / math.sqrt((1 + rho * rho / 2) / (n - 3))


def spearman_power_n(rho: float = 0.2, alpha: float = 0.05, power: float = 0.8) -> int:
    """Pairs needed to detect |ρ| with a two-sided level-α Spearman test at the given power:

        n = ⌈3 + (1 + ρ²/2) · ((z_{1−α/2} + z_{power}) / atanh ρ)²⌉

    Fisher's z = atanh ρ̂ is about normal; for Spearman its variance is (1 + ρ²/2)/(n − 3) (Bonett & Wright 2000)
    rather than Pearson's 1/(n − 3), so Spearman needs a few more pairs (ρ = 0.2: 198 against Pearson's 194)."""
    if not 0 < abs(rho) < 1:
        raise ValueError(f"need 0 < |rho| < 1, got {rho}")
    z = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    return math.ceil(3 + (1 + rho * rho / 2) * (z / math.atanh(abs(rho))) ** 2)


def spearman_power(rho: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided level-α Spearman test at n pairs when the true value is ρ (same approximation as
    `spearman_power_n`, both tails counted), so a report can say how likely a null result was. NaN for n ≤ 3."""
    if n <= 3:
        return math.nan
    delta, zc = _noncentrality(rho, n), st.norm.ppf(1 - alpha / 2)
    return float(st.norm.sf(zc - delta) + st.norm.cdf(-zc - delta))


# ------------------------------------------------------------------ a blocked permutation test


def _between_ss(y: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Between-group sum of squares of each row of y (rows = permutations), groups given by `codes` (0 … k−1)."""
    sums = np.zeros((y.shape[0], k))
    for g in range(k):
        sums[:, g] = y[:, codes == g].sum(1)
    counts = np.bincount(codes, minlength=k).astype(float)
    return (sums**2 / np.where(counts > 0, counts, np.inf)).sum(1)


def blocked_permutation_p(values: Sequence[float], groups: Sequence, blocks: Sequence, *, n_perm: int = 2000,
                          seed: int = 0) -> float:
    """p-value of "the groups (e.g. partner bins) have equal means", with the group labels permuted within each
    block (e.g. a fixed set, whose own difficulty is the same in every group): a repeated-measures test that needs
    no normality. Statistic: the between-group sum of squares of the block-centred values. p = (1 + #{perm ≥
    observed}) / (1 + n_perm). NaN with fewer than two groups."""
    y, g, c = np.asarray(values, dtype=float), np.asarray(groups), np.asarray(blocks)
    _, codes = np.unique(g, return_inverse=True)
    k = int(codes.max()) + 1 if len(codes) else 0
    if k < 2:
        return math.nan
    centred = y.copy()
    rng = np.random.default_rng(seed)
    perms = np.empty((n_perm, len(y)))
    for blk in np.unique(c):
        idx = np.flatnonzero(c == blk)
        centred[idx] -= centred[idx].mean()
        perms[:, idx] = rng.permuted(np.tile(centred[idx], (n_perm, 1)), axis=1)
    obs = _between_ss(centred[None, :], codes, k)[0]
    null = _between_ss(perms, codes, k)
    return float((1 + np.sum(null >= obs - 1e-12)) / (1 + n_perm))


# ------------------------------------------------------------------ clustered trend and equivalence


@dataclass(frozen=True)
class Trend:
    slope: float  # least-squares slope of y on x
    ci: tuple[float, float]  # 95 % cluster-bootstrap CI
    n: int  # complete pairs
    clusters: int  # clusters among them


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x; NaN when x has no spread (no trend can be measured)."""
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan
    dx = x - x.mean()
    return float(dx @ (y - y.mean()) / (dx @ dx))


def clustered_slope(x: Sequence[float], y: Sequence[float], clusters: Sequence, *, n_boot: int = 1000,
                    seed: int = 0) -> Trend:
    """Slope of y on x (e.g. a fixed update's 0/1 outcome against its partners' score bin) with a CI that resamples
    whole clusters (the fixed update), since one update's outcomes across bins share that update's difficulty."""
    a, b, c = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(clusters)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b, c = a[keep], b[keep], c[keep]
    n_clusters = len(np.unique(c))
    slope = _slope(a, b)
    if math.isnan(slope):
        return Trend(math.nan, NAN_CI, len(a), n_clusters)
    ci = cluster_bootstrap(lambda rows: _slope(a[rows], b[rows]), c, n=n_boot, seed=seed)
    return Trend(slope, ci, len(a), n_clusters)


def equivalent(trend: Trend, margin: float) -> bool:
    """True iff the CI lies strictly inside (−margin, margin): a TOST-style equivalence check at the CI's level, so
    "no trend" is claimed only when every slope the data allow is smaller than the margin. False for a NaN CI."""
    lo, hi = trend.ci
    return bool(-margin < lo and hi < margin)
