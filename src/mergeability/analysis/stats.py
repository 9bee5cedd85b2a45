"""Binning, bootstrap confidence intervals, rank correlations, and the binomial-baseline test (paper Fig. 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as st


def bin_centres(scores: Sequence[float], trials: int | None = None, n_bins: int = 5) -> list[float]:
    """Bin centres: k/M for example-level scores (M trials), else n equal-width bins over [0, 1]."""
    if trials:
        return [k / trials for k in range(trials + 1)]
    return [(i + 0.5) / n_bins for i in range(n_bins)]


def assign_bins(scores: Sequence[float], trials: int | None = None, n_bins: int = 5) -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    if trials:
        return np.rint(s * trials).astype(int)
    return np.minimum((s * n_bins).astype(int), n_bins - 1)


def bootstrap_ci(values: Sequence[float], stat: Callable = np.mean, *, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat`; deterministic under `seed`. NaN for fewer than two values."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(v), (n, len(v)))
    draws = stat(v[idx], axis=1) if stat in (np.mean, np.median) else np.array([stat(v[i]) for i in idx])
    a = (1 - level) / 2
    return float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))


@dataclass(frozen=True)
class BinRow:
    centre: float
    count: int
    mean: float
    ci: tuple[float, float]


def per_bin(feature: Sequence[float], scores: Sequence[float], trials: int | None = None, *, seed: int = 0,
            n_bins: int = 5) -> list[BinRow]:
    """Mean of a feature per score bin, with a 95 % bootstrap CI and the count."""
    f = np.asarray(feature, dtype=float)
    bins = assign_bins(scores, trials, n_bins)
    rows = []
    for k, c in enumerate(bin_centres(scores, trials, n_bins)):
        v = f[(bins == k) & ~np.isnan(f)]
        rows.append(BinRow(c, len(v), float(v.mean()) if len(v) else math.nan, bootstrap_ci(v, seed=seed + k)))
    return rows


@dataclass(frozen=True)
class Correlation:
    rho: float
    p: float
    ci: tuple[float, float]
    n: int


def spearman(x: Sequence[float], y: Sequence[float], *, seed: int = 0, n_boot: int = 1000) -> Correlation:
    """Spearman ρ with its p-value and a bootstrap 95 % CI (pairs resampled)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(math.nan, math.nan, (math.nan, math.nan), len(a))
    rho, p = st.spearmanr(a, b)
    # All bootstrap resamples at once: rank each row, then the row-wise Pearson correlation of the ranks.
    idx = np.random.default_rng(seed).integers(0, len(a), (n_boot, len(a)))
    ra, rb = st.rankdata(a[idx], axis=1), st.rankdata(b[idx], axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    boots = ((ra * rb).sum(1) / np.where(den > 0, den, np.nan))
    boots = boots[~np.isnan(boots)]
    ci = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if len(boots) else (math.nan, math.nan)
    return Correlation(float(rho), float(p), ci, len(a))


@dataclass(frozen=True)
class BaselineTest:
    """Observed score histogram against Binomial(M, p̄)/M (paper Fig. 2)."""

    trials: int
    pooled_p: float
    observed: list[int]  # updates with k successes, k = 0..M
    expected: list[float]
    dispersion: float  # observed variance of successes / binomial variance (1 under the baseline)
    dispersion_p: float  # one-sided p-value of the over-dispersion test (χ² with n − 1 dof)
    chi2_p: float  # goodness-of-fit p-value (bins with expected < 5 pooled)


def binomial_baseline(scores: Sequence[float], trials: int) -> BaselineTest:
    k = np.rint(np.asarray(scores, dtype=float) * trials).astype(int)
    n = len(k)
    p = float(k.mean() / trials) if n else math.nan
    observed = [int((k == j).sum()) for j in range(trials + 1)]
    expected = [n * st.binom.pmf(j, trials, p) for j in range(trials + 1)]
    var_binom = trials * p * (1 - p)
    if n < 2 or var_binom == 0:
        return BaselineTest(trials, p, observed, expected, math.nan, math.nan, math.nan)
    stat = float(((k - trials * p) ** 2).sum() / var_binom)  # Tarone-style dispersion statistic
    dispersion = stat / (n - 1)
    dispersion_p = float(st.chi2.sf(stat, n - 1))
    # χ² goodness of fit, pooling adjacent bins until each expects at least 5
    obs_p, exp_p, o_acc, e_acc = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 5:
            obs_p.append(o_acc)
            exp_p.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 and exp_p:
        obs_p[-1] += o_acc
        exp_p[-1] += e_acc
    dof = len(obs_p) - 2  # one parameter (p̄) estimated
    chi2_p = float(st.chi2.sf(sum((o - e) ** 2 / e for o, e in zip(obs_p, exp_p)), dof)) if dof >= 1 else math.nan
    return BaselineTest(trials, p, observed, expected, dispersion, dispersion_p, chi2_p)
