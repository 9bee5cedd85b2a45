"""The mergeability estimator: for each update, M trials of merging it with N sampled partners.

Partners for (target, trial) come from an RNG seeded by (run seed, target, trial) alone, so a trial's result
does not depend on the order trials run in, on resumption, or on which worker runs it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mergeability.backends import LocalPool
from mergeability.errors import MergeabilityError
from mergeability.merging import get_method
from mergeability.updates import Update


def partners_for(seed: int, target: str, trial: int, pool: Sequence[str], n: int) -> list[str]:
    """N partners for one trial, sampled without replacement from `pool` minus the target."""
    others = sorted(p for p in pool if p != target)
    if n > len(others):
        raise MergeabilityError(f"--partners {n} is larger than the pool of {len(others)} other updates")
    digest = hashlib.sha256(f"{seed}\x1f{target}\x1f{trial}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(others, n)


@dataclass(frozen=True)
class Trial:
    target: str
    trial: int
    partners: tuple[str, ...]


def plan_trials(seed: int, targets: Sequence[str], pool: Sequence[str], trials: int, partners: int) -> list[Trial]:
    return [Trial(t, m, tuple(partners_for(seed, t, m, pool, partners))) for t in targets for m in range(trials)]


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
