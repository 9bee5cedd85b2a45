"""A.20-A.22: merge updates of one score bin; mix the lowest- and highest-score updates; grow the merged set."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from mergeability.estimate import group_of, sample_apart
from mergeability.experiments.context import REPEATS, Context
from mergeability.experiments.locality import by_bin, run_member_sets

GROW = (2, 4, 8, 16)  # merged-set sizes of the growth series
MIX = (0.0, 0.25, 0.5, 0.75, 1.0)  # shares of high-score updates in the mixed sets


def units(cfg, sc: dict[str, float], groups: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(key, spec) per merge: one-bin sets, growing sets per bin, low/high mixes; REPEATS draws each. No two
    members of a set share a group (`groups`: id -> subject): each is evaluated under the merge."""
    rng = random.Random(f"{cfg.seed}/groups")
    M = cfg.merge.trials
    out = []

    def add(kind, x, ids, rep):
        spec = {"kind": kind, "x": x, "rep": rep, "merge": sorted(ids)}
        out.append((json.dumps(spec, sort_keys=True), spec))

    size = min(10, cfg.merge.partners + 1)
    for k, members in sorted(by_bin(sc, M).items()):
        apart = len({group_of(groups, i) for i in members})  # the largest set of members with distinct groups
        for rep in range(REPEATS):
            if apart >= 2:
                add("bin", k / M, sample_apart(rng, members, size, groups), rep)
            for n in GROW:
                if n <= apart:
                    add(f"grow:{k / M:.2f}", n, sample_apart(rng, members, n, groups), rep)
    ranked = sorted(sc, key=lambda i: (sc[i], i))
    L = min(size, len(ranked) // 2)
    low, high = ranked[:L], ranked[-L:]
    for frac in MIX:
        for rep in range(REPEATS):
            h = round(frac * L)
            top = sample_apart(rng, high, h, groups)
            add("mix", frac, top + sample_apart(rng, low, L - h, groups, avoid=top), rep)
    return out


@dataclass(frozen=True)
class Groups:
    name = "groups"
    kind = "examples"

    def run(self, ctx: Context, console) -> None:
        run_member_sets(ctx, self.name, units, console)
