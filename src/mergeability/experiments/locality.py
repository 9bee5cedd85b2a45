"""§5.1: fixed sets of top-score updates, each merged with partner groups drawn from every score bin: do the
fixed updates stay correct whatever they are merged with, while the partners do as well as their own score says?"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from mergeability.errors import MergeabilityError
from mergeability.estimate import group_of, sample_apart
from mergeability.experiments.context import Context, kept_updates, main_scores, run_merge_sets

FIXED_SETS = 4  # disjoint fixed sets: more fixed updates, so the repeated-measures test has units to count
# Partner draws per (fixed set, bin). The merge is the unit of the test, and a merge is cheap next to a trial
# pass: with 3 draws a 182-update study had 36 merges and a slope CI of ±0.13, too wide to show stability at ±0.2.
REPEATS = 10


def by_bin(sc: dict[str, float], M: int) -> dict[int, list[str]]:
    """Update ids per score bin k (score = k / M), each list sorted."""
    out: dict[int, list[str]] = {}
    for i in sorted(sc):
        out.setdefault(round(sc[i] * M), []).append(i)
    return out


def fixed_sets(rng: random.Random, sc: dict[str, float], size: int, groups) -> list[list[str]]:
    """Up to FIXED_SETS disjoint sets of `size` updates, no two of a set sharing a group: as many sets as the top
    score bin can fill twice over (so partners for that bin remain), at least one; drawn from the top bin first,
    then down the ranking where the top bin's subjects run out."""
    ranked = sorted(sc, key=lambda i: (-sc[i], i))
    top = [i for i in ranked if sc[i] == sc[ranked[0]]]
    order = rng.sample(top, len(top)) + ranked[len(top):]
    sets: list[list[str]] = []
    for _ in range(max(1, min(FIXED_SETS, len(top) // (2 * size)))):
        used = {i for s in sets for i in s}
        drawn: list[str] = []
        taken: set = set()  # the groups of `drawn`
        for i in order:
            if i not in used and group_of(groups, i) not in taken:
                drawn.append(i)
                taken.add(group_of(groups, i))
            if len(drawn) == size:
                sets.append(sorted(drawn))
                break
    return sets


def units(cfg, sc: dict[str, float], groups: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(key, spec) per merge: each fixed set × each partner bin × REPEATS draws, merging the set with a partner
    group of that bin. A merge has N + 1 members, as a trial does: about half fixed, half partners. No two
    members share a group (`groups`: id -> subject), since every member is evaluated under the merge."""
    rng = random.Random(f"{cfg.seed}/locality")
    size = max(1, (cfg.merge.partners + 1) // 2)
    n_partners = cfg.merge.partners + 1 - size
    sets = fixed_sets(rng, sc, size, groups)
    fixed = {i for s in sets for i in s}
    out = []
    for k, members in sorted(by_bin(sc, cfg.merge.trials).items()):
        pool = [i for i in members if i not in fixed]
        for n, fixed_set in enumerate(sets):
            for rep in range(REPEATS):
                partners = sample_apart(rng, pool, n_partners, groups, avoid=fixed_set)
                if len(partners) < n_partners:  # a smaller merge interferes less: this bin cannot be compared
                    continue
                spec = {"set": n, "fixed": fixed_set, "bin": k / cfg.merge.trials, "rep": rep,
                        "merge": [*fixed_set, *partners]}
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
        def planned(cfg, sc, groups) -> list[tuple[str, dict]]:
            out = units(cfg, sc, groups)
            if not out:
                raise MergeabilityError(f"{ctx.run_dir}: too few kept updates of distinct subjects to form a fixed set "
                                        f"and partner groups of {cfg.merge.partners + 1} members; raise --items")
            return out

        run_member_sets(ctx, self.name, planned, console)
