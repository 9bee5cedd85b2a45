"""A.20-A.22: merge updates of one score bin; mix the lowest- and highest-score updates; grow the merged set."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from mergeability.experiments.context import REPEATS, Context, kept_updates, main_scores, run_merge_sets
from mergeability.experiments.locality import by_bin, correct_by_member, member_payload

GROW = (2, 4, 8, 16)  # merged-set sizes of the growth series
MIX = (0.0, 0.25, 0.5, 0.75, 1.0)  # shares of high-score updates in the mixed sets


def units(cfg, sc: dict[str, float]) -> list[tuple[str, dict]]:
    """(key, spec) per merge: one-bin sets, growing sets per bin, low/high mixes; REPEATS draws each."""
    rng = random.Random(f"{cfg.seed}/groups")
    M = cfg.merge.trials
    out = []

    def add(kind, x, ids, rep):
        spec = {"kind": kind, "x": x, "rep": rep, "merge": sorted(ids)}
        out.append((json.dumps(spec, sort_keys=True), spec))

    size = min(10, cfg.merge.partners + 1)
    for k, members in sorted(by_bin(sc, M).items()):
        for rep in range(REPEATS):
            if len(members) >= 2:
                add("bin", k / M, rng.sample(members, min(size, len(members))), rep)
            for n in GROW:
                if n <= len(members):
                    add(f"grow:{k / M:.2f}", n, rng.sample(members, n), rep)
    ranked = sorted(sc, key=lambda i: (sc[i], i))
    L = min(size, len(ranked) // 2)
    low, high = ranked[:L], ranked[-L:]
    for frac in MIX:
        for rep in range(REPEATS):
            h = round(frac * L)
            add("mix", frac, rng.sample(high, h) + rng.sample(low, L - h), rep)
    return out


@dataclass(frozen=True)
class Groups:
    name = "groups"
    kind = "examples"

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        run_merge_sets(ctx, self.name, units(ctx.cfg, main_scores(ctx, updates)), updates, console,
                       member_payload(ctx.cfg), correct_by_member)
