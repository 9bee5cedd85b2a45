"""The statistics of the follow-up experiments, as pure functions of their numbers (known-answer tested)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st


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
class LocalityTest:
    p: float  # χ² test of independence of the fixed set's correctness and the partners' bin (1.0 if untestable)
    spread: float  # max − min of the fixed set's accuracy across bins


def locality_test(fixed_outcomes: Mapping[float, Sequence[int]]) -> LocalityTest:
    """Partner bin -> the fixed updates' 0/1 outcomes under merges with partners of that bin."""
    xs = sorted(fixed_outcomes)
    acc = [float(np.mean(fixed_outcomes[x])) for x in xs]
    table = [[sum(fixed_outcomes[x]), len(fixed_outcomes[x]) - sum(fixed_outcomes[x])] for x in xs]
    testable = len(xs) > 1 and bool(np.all(np.array(table).sum(0) > 0))
    p = float(st.chi2_contingency(table)[1]) if testable else 1.0
    return LocalityTest(p, max(acc) - min(acc))


@dataclass
class Retention:
    method: str
    T: float
    weak: list[float] = field(default_factory=list)  # per (set, weak task): weighted − plain retained accuracy
    strong: list[float] = field(default_factory=list)


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
    return list(out.values())
