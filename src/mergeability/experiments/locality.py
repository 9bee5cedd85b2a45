"""§5.1: the top-score updates, each merged with a partner group drawn from each score bin: does a high-score
update stay correct whatever it is merged with?"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from mergeability.estimate import sample_apart
from mergeability.experiments.context import REPEATS, Context, kept_updates, main_scores, run_merge_sets


def by_bin(sc: dict[str, float], M: int) -> dict[int, list[str]]:
    """Update ids per score bin k (score = k / M), each list sorted."""
    out: dict[int, list[str]] = {}
    for i in sorted(sc):
        out.setdefault(round(sc[i] * M), []).append(i)
    return out


def units(cfg, sc: dict[str, float], groups: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(key, spec) per merge: up to 10 top-score updates × partner bins × REPEATS draws; no two members of a
    merge share a group (`groups`: id -> subject), since every member is evaluated under it."""
    rng = random.Random(f"{cfg.seed}/locality")
    ranked = sorted(sc, key=lambda i: (-sc[i], i))
    fixed = ranked[: min(10, max(1, len(ranked) // 4))]
    out = []
    for k, members in sorted(by_bin(sc, cfg.merge.trials).items()):
        pool = [i for i in members if i not in fixed]
        if len(pool) < 2:
            continue
        for f in fixed:
            for rep in range(REPEATS):
                partners = sample_apart(rng, pool, cfg.merge.partners, groups, avoid=[f])
                spec = {"fixed": f, "bin": k / cfg.merge.trials, "rep": rep, "merge": [f, *partners]}
                out.append((json.dumps(spec, sort_keys=True), spec))
    return out


def member_payload(cfg):
    """A unit's merge job: the run's method on the unit's members, unweighted."""
    m = cfg.merge
    return lambda spec: (m.method, m.params, spec["merge"], None, cfg.engine == "plain")


def correct_by_member(payload, outcomes) -> dict:
    return {"correct": {m: int(o.correct) for m, o in zip(payload[2], outcomes)}}


def run_member_sets(ctx: Context, name: str, make_units: Callable[[object, dict, dict], list], console) -> None:
    """The locality and groups experiments' work: merge each set of `make_units(cfg, main scores, groups)` with the
    run's method and record every member's 0/1 outcome under that merge, by member id."""
    updates = kept_updates(ctx)
    run_merge_sets(ctx, name, make_units(ctx.cfg, main_scores(ctx, updates), ctx.groups()), updates, console,
                   member_payload(ctx.cfg), correct_by_member)


@dataclass(frozen=True)
class Locality:
    name = "locality"
    kind = "examples"

    def run(self, ctx: Context, console) -> None:
        run_member_sets(ctx, self.name, units, console)
