"""The mergeability estimator: for each update, M trials of merging it with N sampled partners.

Partners for (target, trial) come from an RNG seeded by (run seed, target, trial) alone, so a trial's result
does not depend on the order trials run in, on resumption, or on which worker runs it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from mergeability.backends import LocalPool
from mergeability.errors import MergeabilityError
from mergeability.merging import get_method
from mergeability.updates import Update


def group_of(groups: Mapping[str, str] | None, update: str) -> tuple[str, ...]:
    """The group an update belongs to (an example-level run groups items by subject); an update the grouping
    does not name is a group of its own."""
    return (update,) if groups is None or update not in groups else ("", groups[update])


def partners_for(seed: int, target: str, trial: int, pool: Sequence[str], n: int,
                 groups: Mapping[str, str] | None = None) -> list[str]:
    """N partners for one trial, sampled without replacement from `pool` minus every update of the target's
    group (`groups`: update id -> group; by default each update is its own). Updates about one subject share
    their training passage, so a partner of the target's subject would teach it its own fact."""
    own = group_of(groups, target)
    others = sorted(p for p in pool if p != target and group_of(groups, p) != own)
    if n > len(others):
        about = "" if groups is None else f" outside {target}'s group"
        raise MergeabilityError(f"--partners {n} is larger than the pool of {len(others)} other updates{about}: "
                                "lower --partners or raise --items")
    digest = hashlib.sha256(f"{seed}\x1f{target}\x1f{trial}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(others, n)


def sample_apart(rng: random.Random, pool: Sequence[str], n: int, groups: Mapping[str, str] | None = None,
                 avoid: Iterable[str] = ()) -> list[str]:
    """Up to `n` of `pool` drawn by `rng`, no two of one group and none of the groups of `avoid`: a merge set
    whose members share no subject. Where the pool's groups are all distinct and `avoid` shares none of them,
    it is exactly `rng.sample(pool, n)`, so sets drawn before groups existed are drawn again."""
    taken = {group_of(groups, a) for a in avoid}
    eligible = [p for p in pool if group_of(groups, p) not in taken]
    out: list[str] = []
    for p in rng.sample(eligible, min(n, len(eligible))):
        if group_of(groups, p) not in taken:
            out.append(p)
            taken.add(group_of(groups, p))
    if len(out) < n:  # a group came twice, or the pool is short: with distinct groups the rest is empty
        rest = [p for p in eligible if group_of(groups, p) not in taken]
        rng.shuffle(rest)
        for p in rest:
            if len(out) < n and group_of(groups, p) not in taken:
                out.append(p)
                taken.add(group_of(groups, p))
    return out


@dataclass(frozen=True)
class Trial:
    target: str
    trial: int
    partners: tuple[str, ...]


def plan_trials(seed: int, targets: Sequence[str], pool: Sequence[str], trials: int, partners: int,
                groups: Mapping[str, str] | None = None) -> list[Trial]:
    """M trials per target; `groups` (update id -> subject) keeps each target's own group out of its partners."""
    return [Trial(t, m, tuple(partners_for(seed, t, m, pool, partners, groups))) for t in targets
            for m in range(trials)]


def params_key(method: str, params: Mapping) -> str:
    """A canonical string of a method's parameters: part of a trial's unique key."""
    return json.dumps({"method": method, **params}, sort_keys=True)


def merge_route(method: str, params: Mapping, reference: bool) -> Callable[..., Update]:
    """The method's fast `merge`, or its obvious `reference` route (what the plain engine checks with)."""
    merger = get_method(method, **params)
    return merger.reference if reference else merger.merge


def trial_chunk(evaluate, updates: Mapping[str, Update], payload) -> list:
    """One job: merge each trial of a chunk, then evaluate the chunk in one batch."""
    method, params, batch, reference = payload
    merge = merge_route(method, params, reference)
    merged = [merge([updates[t.target], *(updates[p] for p in t.partners)]) for t in batch]
    return list(evaluate(batch, merged))


def merge_set_job(evaluate, updates: Mapping[str, Update], payload) -> list:
    """One job: merge a set of updates once (with optional weights), then evaluate every member's own item or
    task under that one merge. The experiments' unit of work."""
    method, params, members, weights, reference = payload
    merged = merge_route(method, params, reference)([updates[m] for m in members], weights)
    return list(evaluate([Trial(m, 0, ()) for m in members], [merged] * len(members)))


def run_trials(
    plan: Sequence[Trial],
    updates: Mapping[str, Update],
    method: str,
    params: Mapping,
    evaluate: Callable[[Sequence[Trial], Sequence[Update]], Sequence[object]],
    record: Callable[[Trial, object], None],
    done: set[tuple[str, int]] = frozenset(),
    chunk: int = 8,
    pool=None,
    reference: bool = False,
) -> None:
    """Merge and evaluate every planned trial not in `done`, `chunk` at a time (one batched evaluation each);
    `record` stores each result as it comes, so a kill loses at most the chunks in flight.

    Chunks are fixed slices of the whole plan, so a resumed run, or a run on another backend, evaluates every
    chunk in the same batch as an uninterrupted local run: results are bit-identical. `pool` (see `backends`)
    runs the chunks elsewhere, with its own evaluator; by default they run here with `evaluate`. `reference`
    merges by each method's obvious route (the plain engine's end-to-end check of the fast merges).
    """
    get_method(method, **params)  # a bad method fails here, not in a worker
    pool = pool or LocalPool(evaluate, updates)
    chunks = [list(plan[s : s + chunk]) for s in range(0, len(plan), chunk)]
    todo = [c for c in chunks if not all((t.target, t.trial) in done for t in c)]
    for i, results in pool.map(trial_chunk, [(method, dict(params), c, reference) for c in todo]):
        for t, result in zip(todo[i], results):
            if (t.target, t.trial) not in done:
                record(t, result)
