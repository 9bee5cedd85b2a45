"""Multiple-choice conversion: gold + distractors from other questions' answers, seeded order, k-shot prompt."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergeability.data.facts import Fact
from mergeability.errors import MergeabilityError
from mergeability.seeding import rng

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def alias_key(text: str) -> str:
    """The form two answers are compared in when options must be alias-free: lowercase, no punctuation, no
    articles, single spaces (SQuAD-style)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@dataclass(frozen=True)
class MCItem:
    fact: Fact
    options: tuple[str, ...]
    gold: int  # index of the gold answer in options
    prompt: str  # k solved examples + this question, ending in "Answer:"; options follow after a space

    @property
    def id(self) -> str:
        return self.fact.id


def format_qa(question: str, answer: str | None = None) -> str:
    return f"Question: {question}\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def build_items(
    facts: Sequence[Fact],
    *,
    pools: Mapping[str, Sequence[str]] | None = None,
    n_options: int = 8,
    k_shot: int = 3,
    distractors: str = "relation",
    seed: int = 0,
) -> list[MCItem]:
    """One MCItem per fact. `pools` maps relation -> candidate answers (default: the facts' own answers)."""
    if distractors not in ("relation", "any"):
        raise MergeabilityError(f"distractors must be 'relation' or 'any', got {distractors!r}")
    if pools is None:
        pools = {}
        for f in facts:
            pools.setdefault(f.prop, []).append(f.obj)
    everything = sorted({a for answers in pools.values() for a in answers})
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.prop, []).append(f)
    shots = {rel: rng(seed, "shots", rel).sample(fs, min(len(fs), k_shot + 1)) for rel, fs in by_rel.items()}

    items = []
    for f in facts:
        banned = {alias_key(a) for a in (f.obj, *f.possible_answers)}
        seen, candidates = set(banned), []
        for a in sorted(set(pools.get(f.prop, ()) if distractors == "relation" else everything)):
            if alias_key(a) not in seen:
                seen.add(alias_key(a))
                candidates.append(a)
        if len(candidates) < n_options - 1:
            raise MergeabilityError(
                f"relation {f.prop!r} has only {len(candidates) + 1} distinct answers, {n_options} options are needed: "
                "leave it out or use distractors='any'"
            )
        draw = rng(seed, "item", f.id)
        options = [f.obj, *draw.sample(candidates, n_options - 1)]
        draw.shuffle(options)
        own = [s for s in shots[f.prop] if s.id != f.id and s.question != f.question][:k_shot]
        prompt = "".join(format_qa(s.question, s.obj) for s in own) + format_qa(f.question)
        items.append(MCItem(f, tuple(options), options.index(f.obj), prompt))
    return items
