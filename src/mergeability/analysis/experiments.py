"""The statistics of the follow-up experiments, as pure functions of their numbers (known-answer tested)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st

from mergeability.analysis.inference import NAN_CI, Trend, blocked_permutation_p, cluster_bootstrap, clustered_slope


@dataclass(frozen=True)
class SignTest:
    more: int  # units at the top under B and not under A
    fewer: int  # units at the top under A and not under B
    p: float  # two-sided binomial test of more vs fewer; nan when no unit is discordant


def sign_test(a: Sequence[bool], b: Sequence[bool]) -> SignTest:
    """McNemar-style exact sign test on paired 0/1 outcomes: does B put more units at the top than A?"""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    more, fewer = int((b & ~a).sum()), int((a & ~b).sum())
    p = float(st.binomtest(more, more + fewer).pvalue) if more + fewer else math.nan
    return SignTest(more, fewer, p)


@dataclass(frozen=True)
class LocalityStats:
    """§5.1 in numbers. The unit is the merge: the fixed updates of one merge share its partner draw, so they are
    not independent of each other. Per merge, the fixed set's accuracy; per partner bin, the means."""

    bins: list[float]
    merges: list[int]  # merges per bin
    fixed_acc: list[float]
    partner_acc: list[float]
    p: float  # blocked permutation test: equal fixed-set accuracy across bins, bins permuted within each fixed set
    trend: Trend  # slope of the fixed set's per-merge accuracy on the partners' bin, merges resampled
    spread: float  # max − min of fixed_acc
    partner_mean: dict[str, float]  # each partner update's mean outcome over the merges it was a partner in


def locality_stats(done: Sequence[tuple[dict, dict]], seed: int = 0) -> LocalityStats:
    """`done`: (spec, result) per locality merge: spec has 'fixed' (ids), 'bin', 'set'; result has 'correct'
    (member id -> 0/1)."""
    fixed_acc, bin_of, set_of, partner_acc = [], [], [], []
    partners: dict[str, list[int]] = {}
    for spec, res in done:
        c = res["correct"]
        fixed_acc.append(float(np.mean([c[i] for i in spec["fixed"]])))
        bin_of.append(spec["bin"])
        set_of.append(spec["set"])
        others = [(i, v) for i, v in c.items() if i not in spec["fixed"]]
        partner_acc.append(float(np.mean([v for _, v in others])) if others else math.nan)
        for i, v in others:
            partners.setdefault(i, []).append(v)
    f, x = np.array(fixed_acc), np.array(bin_of)
    bins = sorted(set(bin_of))
    by_bin = [f[x == b] for b in bins]
    means = [float(v.mean()) for v in by_bin]
    return LocalityStats(
        bins, [len(v) for v in by_bin], means,
        [float(np.nanmean(np.array(partner_acc)[x == b])) for b in bins],
        blocked_permutation_p(f, x, set_of, seed=seed),
        clustered_slope(x, f, np.arange(len(f)), seed=seed),
        max(means) - min(means) if means else math.nan,
        {i: float(np.mean(v)) for i, v in partners.items()})


@dataclass
class Retention:
    method: str
    T: float
    weak: list[float] = field(default_factory=list)  # per (set, weak task): weighted − plain retained accuracy
    strong: list[float] = field(default_factory=list)
    weak_tasks: list[str] = field(default_factory=list)  # the task of each value: tasks recur across sets
    strong_tasks: list[str] = field(default_factory=list)
    weak_sets: list[int] = field(default_factory=list)  # the set of each value: the unit of the paired test
    strong_sets: list[int] = field(default_factory=list)


def _by_merge(rows: Mapping[str, dict]) -> tuple[dict, dict]:
    """(plain, weighted) merges of the weighted experiment: (set, method, T) -> (unit, accuracy by task)."""
    plain, weighted = {}, {}
    for key, res in rows.items():
        u = json.loads(key)
        (plain if u["T"] is None else weighted)[(u["set"], u["method"], u["T"])] = (u, res["acc"])
    return plain, weighted


def retention_changes(rows: Mapping[str, dict], tasks: Mapping[str, dict]) -> list[Retention]:
    """Per (method, T): the change in retained accuracy (accuracy after the merge / fine-tuned accuracy),
    weighted minus plain, of every weak and strong task of every set that has both merges."""
    plain, weighted = _by_merge(rows)
    out: dict[tuple[str, float], Retention] = {}
    for (s, method, T), (u, acc) in sorted(weighted.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if (s, method, None) not in plain:
            continue
        base = plain[(s, method, None)][1]
        r = out.setdefault((method, T), Retention(method, T))
        for group in ("weak", "strong"):
            for n in u[group]:
                ft = tasks[n]["ft_acc"] or math.nan
                getattr(r, group).append((acc[n] - base[n]) / ft)
                getattr(r, f"{group}_tasks").append(n)
                getattr(r, f"{group}_sets").append(s)
    return list(out.values())


@dataclass(frozen=True)
class Losses:
    """What the plain merge of one method costs each (set, task): 1 − accuracy after the merge / fine-tuned."""

    values: list[float]
    weak: list[bool]  # True for a weak task, False for a strong one
    tasks: list[str]


def plain_losses(rows: Mapping[str, dict], tasks: Mapping[str, dict], method: str) -> Losses:
    values, weak, names = [], [], []
    for (_, m, _), (u, acc) in sorted(_by_merge(rows)[0].items(), key=lambda kv: kv[0][0]):
        if m != method:
            continue
        for group in ("weak", "strong"):
            for n in u[group]:
                values.append(1.0 - acc[n] / (tasks[n]["ft_acc"] or math.nan))
                weak.append(group == "weak")
                names.append(n)
    return Losses(values, weak, names)


def group_gap(values: Sequence[float], first: Sequence[bool], clusters: Sequence, *, n: int = 1000,
              seed: int = 0) -> tuple[float, tuple[float, float]]:
    """mean(values where `first`) − mean(the rest), with a 95 % CI that resamples whole clusters (tasks: a task
    recurs across sets, and each task is in one group). A resample that lacks either group is skipped."""
    v, f = np.asarray(values, dtype=float), np.asarray(first, dtype=bool)
    if not f.any() or f.all():
        return math.nan, NAN_CI

    def gap(rows: np.ndarray) -> float:
        a, b = v[rows][f[rows]], v[rows][~f[rows]]
        return float(a.mean() - b.mean()) if len(a) and len(b) else math.nan

    return gap(np.arange(len(v))), cluster_bootstrap(gap, clusters, n=n, seed=seed)


def set_means(values: Sequence[float], sets: Sequence[int]) -> np.ndarray:
    """The mean of each set's values, in set order: one paired difference per set."""
    v, s = np.asarray(values, dtype=float), np.asarray(sets)
    return np.array([v[s == k].mean() for k in np.unique(s)])


EXACT_UP_TO = 16  # sign-flip tests list all 2^n sign vectors up to this many pairs (65,536), else sample them


def sign_flip_p(diffs: Sequence[float], *, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of "the paired differences are centred on 0" (weighted vs plain, one difference per set):
    under the null either label of a pair is as likely, so each difference's sign is flipped. Statistic |mean|;
    exact over all 2^n sign vectors for n ≤ EXACT_UP_TO, else p = (1 + #{|mean*| ≥ |mean|}) / (1 + n_perm) from
    random ones. NaN with no differences."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean()) - 1e-12  # a tolerance so that sign vectors tying the observed mean count
    if n <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) / n >= observed))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
    return float((1 + np.sum(np.abs(signs @ d) / n >= observed)) / (1 + n_perm))
