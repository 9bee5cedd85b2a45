"""Leakage: one update's fact inside another update's training text.

An update *leaks* when the passage of another update about a different subject mentions both its subject and its
answer (any alias), compared in `alias_key` form on word boundaries. A partner that teaches the target's own fact
inflates the target's score, and the paper's §5.1 is about merging updates that share no knowledge. Updates
about the same subject are never partners (`estimate.plan_trials`), so they are not compared here.

The test is deliberately blunt (co-occurrence, not meaning): it may flag a passage that names a neighbour and a
region without saying the neighbour lies there, never the other way round, so "0 leaking" is a safe claim.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mergeability.data.facts import Fact
from mergeability.data.mc import alias_key


@dataclass(frozen=True)
class Taught:
    """What one update knows (its subject and answers) and what it was trained on."""

    id: str
    subject: str
    answers: tuple[str, ...]
    passage: str

    @classmethod
    def of(cls, fact: Fact) -> Taught:
        return cls(fact.id, fact.subj, (fact.obj, *fact.possible_answers), fact.passage or "")

    # alias_key forms, computed once: the audit compares every update with many passages
    @functools.cached_property
    def subject_key(self) -> str:
        return alias_key(self.subject)

    @functools.cached_property
    def answer_keys(self) -> tuple[str, ...]:
        return tuple(k for k in dict.fromkeys(alias_key(a) for a in self.answers) if k)

    @functools.cached_property
    def text(self) -> str:
        return alias_key(self.passage)


def mentions(text: str, phrase: str) -> bool:
    """Whether normalised `text` holds normalised `phrase` as whole words (`text` already in alias_key form)."""
    p = alias_key(phrase)
    return bool(p) and f" {p} " in f" {text} "


def _holds(text: str, key: str) -> bool:
    return bool(key) and f" {key} " in f" {text} "


def teaches(text: str, other: Taught) -> bool:
    """Whether a passage (`text`, in alias_key form) states `other`'s fact: its subject and one of its answers."""
    return _holds(text, other.subject_key) and any(_holds(text, a) for a in other.answer_keys)


class _Index:
    """Passages by the words they hold, and updates by the first word of their subject: each comparison is made
    only where the shared word makes a leak possible, so auditing n updates costs about n passages' words."""

    def __init__(self) -> None:
        self.taught: list[Taught] = []
        self.by_word: dict[str, list[int]] = {}  # word -> updates whose passage holds it
        self.by_subject: dict[str, list[int]] = {}  # first word of the subject -> updates about it

    def add(self, t: Taught) -> None:
        k = len(self.taught)
        self.taught.append(t)
        for w in set(t.text.split()):
            self.by_word.setdefault(w, []).append(k)
        if t.subject_key:
            self.by_subject.setdefault(t.subject_key.split()[0], []).append(k)

    def taught_by(self, t: Taught) -> Iterable[Taught]:
        """Indexed updates about another subject whose passage states `t`'s fact."""
        first = t.subject_key.split()[0] if t.subject_key else ""
        return (u for u in map(self.taught.__getitem__, self.by_word.get(first, ()))
                if u.subject != t.subject and teaches(u.text, t))

    def taught_in(self, t: Taught) -> Iterable[Taught]:
        """Indexed updates about another subject whose fact `t`'s passage states."""
        hits = {k for w in set(t.text.split()) for k in self.by_subject.get(w, ())}
        return (u for u in map(self.taught.__getitem__, sorted(hits))
                if u.subject != t.subject and teaches(t.text, u))


def audit(taught: Sequence[Taught]) -> set[str]:
    """The ids whose fact another update's passage (about a different subject) states."""
    index = _Index()
    for t in taught:
        index.add(t)
    return {t.id for t in taught if any(True for _ in index.taught_by(t))}


def leak_free(facts: Iterable[Fact], limit: int | None = None, *, per_subject: int | None = None,
              quotas: Mapping[str, int] | None = None) -> list[Fact]:
    """Facts taken in order, each kept only if no kept fact's passage states it and its passage states no
    kept fact; stops at `limit`. What the bundled builders sample through, so their audit is 0 by construction.

    `per_subject`: at most this many kept facts per subject. `quotas`: at most quotas[relation] kept facts of a
    relation while the stream lasts; a fact held back by its quota is taken up afterwards, in order, if `limit`
    is not reached, so a relation short of candidates leaves its share to the others.
    """
    index, out, held = _Index(), [], []
    per_rel: dict[str, int] = {}
    per_subj: dict[str, int] = {}

    def take(f: Fact, capped: bool) -> None:
        if capped and quotas is not None and per_rel.get(f.prop, 0) >= quotas.get(f.prop, 0):
            held.append(f)
            return
        if per_subject is not None and per_subj.get(f.subj, 0) >= per_subject:
            return
        t = Taught.of(f)
        if any(True for _ in index.taught_by(t)) or any(True for _ in index.taught_in(t)):
            return
        index.add(t)
        out.append(f)
        per_rel[f.prop] = per_rel.get(f.prop, 0) + 1
        per_subj[f.subj] = per_subj.get(f.subj, 0) + 1

    for stream, capped in ((facts, True), (held, False)):
        for f in stream:
            if limit is not None and len(out) >= limit:
                return out
            take(f, capped)
    return out


def per_subject_sample(facts: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    """At most `n` facts per subject, drawn by seed, in their original order; subjects with `n` or fewer facts
    keep all of them and draw nothing, so data with distinct subjects comes back unchanged."""
    by_subject: dict[str, list[int]] = {}
    for k, f in enumerate(facts):
        by_subject.setdefault(f.subj, []).append(k)
    rng = random.Random(f"{seed}/per_subject")
    keep = set()
    for ks in by_subject.values():
        keep.update(ks if len(ks) <= n else rng.sample(ks, n))
    return [f for k, f in enumerate(facts) if k in keep]
