"""Where a run's facts come from: the bundled `geo` dataset, PopQA on the hub, or a file in the PopQA schema."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from mergeability.data.facts import Fact, load_file, load_hub
from mergeability.data.geo import build_geo
from mergeability.errors import MergeabilityError


def load_facts(
    dataset: str,
    *,
    relations: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """Facts of `dataset` ('geo', 'popqa', or a file), filtered to `relations`, `limit` of them sampled by seed.

    The sample keeps every relation represented in proportion; it is what a run screens.
    """
    if dataset == "geo":
        return build_geo(relations=relations, limit=limit, seed=seed)
    if dataset == "popqa":
        facts = load_hub()
    elif Path(dataset).suffix or Path(dataset).exists():
        facts = load_file(dataset)
    else:
        raise MergeabilityError(f"unknown dataset {dataset!r}: use geo, popqa, or a .tsv/.jsonl/.parquet file")
    if relations:
        known = sorted({f.prop for f in facts})
        bad = [r for r in relations if r not in known]
        if bad:
            raise MergeabilityError(f"unknown relation {bad[0]!r} in {dataset}: choose from {', '.join(known)}")
        facts = [f for f in facts if f.prop in relations]
    if limit is not None and limit < len(facts):
        facts = random.Random(seed).sample(facts, limit)
    return facts
