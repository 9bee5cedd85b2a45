"""Where a run's facts come from: the bundled `geo` dataset, BIG-bench's Wikidata facts (`wikidata`), PopQA on
the hub, or a file in the PopQA schema; and where each relation's distractors come from."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from mergeability.data.facts import Fact, load_file, load_hub
from mergeability.data.geo import answer_pool as geo_answers
from mergeability.data.geo import build_geo
from mergeability.data.leakage import per_subject_sample
from mergeability.data.wikidata import answer_pool as wikidata_answers
from mergeability.data.wikidata import build_wikidata
from mergeability.errors import MergeabilityError


def load_facts(
    dataset: str,
    *,
    relations: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    per_subject: int = 1,
    n_options: int = 8,
) -> list[Fact]:
    """Facts of `dataset` ('geo', 'wikidata', 'popqa', or a file), filtered to `relations`, `limit` of them
    sampled by seed (`n_options`: wikidata keeps the relations whose answers give that many options).

    The sample keeps every relation represented in proportion and at most `per_subject` questions per subject
    (drawn by seed); it is what a run screens.
    """
    if per_subject < 1:
        raise MergeabilityError(f"--per-subject must be at least 1 (1 = one question per subject), got {per_subject}")
    if dataset == "geo":
        return build_geo(relations=relations, limit=limit, seed=seed, per_subject=per_subject)
    if dataset == "wikidata":  # only relations with `n_options` distinct answers can be asked
        return build_wikidata(relations=relations, limit=limit, seed=seed, per_subject=per_subject,
                              n_options=n_options)
    if dataset == "popqa":
        facts = load_hub()
    elif Path(dataset).suffix or Path(dataset).exists():
        facts = load_file(dataset)
    else:
        raise MergeabilityError(f"unknown dataset {dataset!r}: use geo, wikidata, popqa, or a .tsv/.jsonl/.parquet "
                                "file")
    if relations:
        known = sorted({f.prop for f in facts})
        bad = [r for r in relations if r not in known]
        if bad:
            raise MergeabilityError(f"unknown relation {bad[0]!r} in {dataset}: choose from {', '.join(known)}")
        facts = [f for f in facts if f.prop in relations]
    facts = per_subject_sample(facts, per_subject, seed)
    if limit is not None and limit < len(facts):
        facts = random.Random(seed).sample(facts, limit)
    return facts


def answer_pools(dataset: str, relations: Iterable[str]) -> dict[str, list[str]] | None:
    """Each relation's distractor universe: every answer it has in a bundled dataset (geo, wikidata); None for the
    others, whose items draw distractors from the run's own answers."""
    if dataset == "geo":
        return {r: geo_answers(r) for r in relations}
    if dataset == "wikidata":
        return {r: wikidata_answers(r) for r in relations}
    return None
