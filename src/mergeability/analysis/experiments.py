"""The statistics of the follow-up experiments, as pure functions of their numbers (known-answer tested)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st

from mergeability.analysis.inference import Trend, clustered_slope, cochran_q


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
    """§5.1 in numbers: per partner bin the fixed set's and the partners' accuracy; the repeated-measures test."""

    bins: list[float]
    merges: list[int]  # merges per bin
    fixed_acc: list[float]
    partner_acc: list[float]
    q: float  # Cochran's Q over blocks (fixed update, repeat) × bins (bins every block has)
    q_p: float
    trend: Trend  # slope of the fixed updates' outcomes on the partners' bin, clustered by fixed update
    spread: float  # max − min of fixed_acc
    partner_mean: dict[str, float]  # each partner update's mean outcome over the merges it was a partner in


def locality_stats(done: Sequence[tuple[dict, dict]], seed: int = 0) -> LocalityStats:
    """`done`: (spec, result) per locality merge: spec has 'fixed' (ids), 'bin', 'rep', 'set'; result has
    'correct' (member id -> 0/1)."""
    fixed: list[tuple[str, int, float, int]] = []  # (fixed id, rep, bin, outcome)
    partners: dict[str, list[int]] = {}
    by_bin: dict[float, dict[str, list[float]]] = {}
    for spec, res in done:
        c, b = res["correct"], spec["bin"]
        d = by_bin.setdefault(b, {"fixed": [], "partners": [], "merges": []})
        d["merges"].append(1)
        for i, v in c.items():
            if i in spec["fixed"]:
                fixed.append((i, spec["rep"], b, v))
                d["fixed"].append(v)
            else:
                partners.setdefault(i, []).append(v)
                d["partners"].append(v)
    bins = sorted(by_bin)
    blocks: dict[tuple[str, int], dict[float, int]] = {}
    for i, rep, b, v in fixed:
        blocks.setdefault((i, rep), {})[b] = v
    common = [b for b in bins if all(b in row for row in blocks.values())]
    q, q_p = cochran_q(np.array([[row[b] for b in common] for row in blocks.values()], dtype=float))
    trend = clustered_slope([f[2] for f in fixed], [f[3] for f in fixed], [f[0] for f in fixed], seed=seed)
    fixed_acc = [float(np.mean(by_bin[b]["fixed"])) for b in bins]
    return LocalityStats(bins, [len(by_bin[b]["merges"]) for b in bins], fixed_acc,
                         [float(np.mean(by_bin[b]["partners"])) if by_bin[b]["partners"] else math.nan for b in bins],
                         q, q_p, trend, max(fixed_acc) - min(fixed_acc) if fixed_acc else math.nan,
                         {i: float(np.mean(v)) for i, v in partners.items()})


@dataclass
class Retention:
    method: str
    T: float
    weak: list[float] = field(default_factory=list)  # per (set, weak task): weighted − plain retained accuracy
    strong: list[float] = field(default_factory=list)
    weak_tasks: list[str] = field(default_factory=list)  # the task of each value: tasks recur across sets
    strong_tasks: list[str] = field(default_factory=list)


def retention_changes(rows: Mapping[str, dict], tasks: Mapping[str, dict]) -> list[Retention]:
    """Per (method, T): the change in retained accuracy (accuracy after the merge / fine-tuned accuracy),
    weighted minus plain, of every weak and strong task of every set that has both merges."""
    plain, weighted = {}, {}
    for key, res in rows.items():
        u = json.loads(key)
        (plain if u["T"] is None else weighted)[(u["set"], u["method"], u["T"])] = (u, res["acc"])
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
    return list(out.values())
