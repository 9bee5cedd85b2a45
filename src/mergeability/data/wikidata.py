"""The `wikidata` dataset: real Wikidata facts, offline, from BIG-bench's `qa_wikidata` task (about 20,000
prompts over 82 relations; BIG-bench is Apache-2.0, Wikidata CC0), as PopQA-schema facts.

Each BIG-bench prompt ("The country of 1912 Summer Olympics is", "Ürümqi is capital of") is parsed into a relation
and a subject (`wikidata_relations`); its targets become the answers: `obj` the first, `possible_answers` all.
A relation is usable when its answers give `n_options` distinct options (the gold and same-relation distractors);
a fact whose own answers leave fewer than `n_options` - 1 others (a flag of many colors) is not asked. Each fact's
training passage is prose about its subject stating every fact the dataset holds about it (each by its first
answer), in several declarative wordings; a run asks one question per subject (`per_subject`), sampled leak-free.

Popularity: the task has none (PopQA uses Wikipedia page views), so `s_pop` is a proxy: the number of the
dataset's facts the subject takes part in, as their subject or as an answer (France: 1,085; most people: 1). An
entity Wikidata's sampled facts touch more often tends to be better known; it is a coarse, skewed stand-in.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeability import seeding
from mergeability.data.bigbench import QA_WIKIDATA, bigbench_member
from mergeability.data.facts import Fact
from mergeability.data.leakage import leak_free
from mergeability.data.mc import alias_key
from mergeability.data.prose import entry
from mergeability.data.wikidata_relations import BY_NAME, RELATIONS
from mergeability.errors import MergeabilityError

MASK = " [MASK]"  # a few prompts end with it; it carries no meaning
_LONGEST_FIRST = sorted(RELATIONS, key=lambda r: -len(r.phrase))  # "country of citizenship of" before "country of"
_WORDINGS = {r.name: r.wordings for r in RELATIONS}


@dataclass(frozen=True)
class Record:
    """One (relation, subject) of the task with all its answers, in the task's order."""

    relation: str
    subject: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A parsed task.json, indexed the ways a build reads it."""

    records: tuple[Record, ...]
    by_subject: Mapping[str, tuple[Record, ...]]
    pools: Mapping[str, tuple[str, ...]]  # relation -> every answer it has in the dataset, sorted
    keys: Mapping[str, frozenset[str]]  # relation -> its answers in alias_key form (what counts as distinct)
    answered: Mapping[str, int]  # entity -> how many records it answers
    source: str  # the file, for messages


def parse_input(text: str) -> tuple[str, str]:
    """(relation name, subject) of one BIG-bench prompt."""
    text = text.strip().removesuffix(MASK)
    for r in _LONGEST_FIRST:
        if r.after and text.endswith(" " + r.phrase):
            subject = text[: -len(r.phrase) - 1]
        elif not r.after and text.startswith(f"The {r.phrase} ") and text.endswith(" is"):
            subject = text[len(r.phrase) + 5 : -3]
        else:
            continue
        if subject.strip():
            return r.name, subject.strip()
    raise MergeabilityError(f"no known relation in the prompt {text!r}: qa_wikidata prompts read 'The <relation> "
                            "<subject> is' or '<subject> <relation>' with a relation of wikidata_relations")


def _targets(example: object, where: str) -> tuple[str, ...]:
    target = example.get("target") if isinstance(example, dict) else None
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise MergeabilityError(f"{where}: 'target' must be a string or a list of strings")
    return tuple(dict.fromkeys(t.strip() for t in targets if t.strip()))


def read_task(path: Path) -> tuple[Record, ...]:
    """The records of a task.json; a (relation, subject) asked twice gets the union of its answers."""
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeabilityError(f"{path}: not a BIG-bench task.json with an 'examples' list ({type(e).__name__}); "
                                "point path at qa_wikidata/task.json") from None
    merged: dict[tuple[str, str], dict[str, None]] = {}
    for i, ex in enumerate(examples, start=1):
        where = f"{path}, example {i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise MergeabilityError(f"{where}: 'input' must be a string")
        relation, subject = parse_input(ex["input"])
        answers = _targets(ex, where)
        # A '?' in a title would put a question mark into passages, which must never read as questions.
        if not answers or "?" in subject or any("?" in a for a in answers):
            continue
        merged.setdefault((relation, subject), {}).update(dict.fromkeys(answers))
    return tuple(Record(r, s, tuple(a)) for (r, s), a in merged.items())


@functools.lru_cache(maxsize=4)
def _table(file: str, _mtime_ns: int) -> Table:
    records = read_task(Path(file))
    by_subject: dict[str, list[Record]] = {}
    pools: dict[str, set[str]] = {}
    answered: Counter[str] = Counter()
    for rec in records:
        by_subject.setdefault(rec.subject, []).append(rec)
        pools.setdefault(rec.relation, set()).update(rec.answers)
        answered.update(rec.answers)
    return Table(records, {s: tuple(rs) for s, rs in by_subject.items()},
                 {r: tuple(sorted(p)) for r, p in pools.items()},
                 {r: frozenset(alias_key(a) for a in p) for r, p in pools.items()}, answered, file)


def table(path: str | Path | None = None) -> Table:
    """The parsed task: `path`, or BIG-bench's qa_wikidata fetched on first use. Parsed once per file version."""
    file = Path(path) if path is not None else bigbench_member(QA_WIKIDATA)
    if not file.exists():
        raise MergeabilityError(f"{file}: no such file; pass a BIG-bench qa_wikidata task.json")
    return _table(str(file), file.stat().st_mtime_ns)


def usable_relations(n_options: int = 8, path: str | Path | None = None) -> list[str]:
    """The relations whose answers give `n_options` distinct options, by name."""
    t = table(path)
    return sorted(r for r, keys in t.keys.items() if len(keys) >= n_options)


def answer_pool(relation: str, path: str | Path | None = None) -> list[str]:
    """Every answer `relation` has in the dataset: the universe its distractors are drawn from."""
    t = table(path)
    if relation not in t.pools:
        raise MergeabilityError(f"unknown relation {relation!r} for wikidata: choose from {', '.join(sorted(t.pools))}")
    return list(t.pools[relation])


def _chosen(t: Table, relations: Sequence[str] | None, n_options: int) -> list[str]:
    """The relations a build uses: `relations` (checked), or every usable one."""
    usable = sorted(r for r, keys in t.keys.items() if len(keys) >= n_options)
    if not usable:
        raise MergeabilityError(f"{t.source}: no relation has {n_options} distinct answers, so none gives "
                                f"{n_options}-option questions with same-relation distractors: lower n_options")
    for r in relations or ():
        if r not in t.keys:
            raise MergeabilityError(f"unknown relation {r!r} for wikidata: choose from {', '.join(usable)}")
        if r not in usable:
            raise MergeabilityError(f"relation {r!r} has only {len(t.keys[r])} distinct answers in wikidata, "
                                    f"{n_options} options need {n_options}: choose from {', '.join(usable)}")
    return list(relations) if relations else usable


def _askable(rec: Record, t: Table, n_options: int) -> bool:
    """Whether the relation's other answers leave `n_options` - 1 distractors for this record."""
    own = {alias_key(a) for a in rec.answers}
    return len(t.keys[rec.relation] - own) >= n_options - 1


def _fact(rec: Record, t: Table) -> Fact:
    about = t.by_subject[rec.subject]
    passage = entry(rec.subject, [(r.relation, r.answers[0]) for r in about], _WORDINGS)
    pop = len(about) + t.answered.get(rec.subject, 0)  # the popularity proxy of the module docstring
    return Fact(f"wikidata/{rec.relation.replace(' ', '_')}/{rec.subject}", rec.subject, rec.relation,
                rec.answers[0], float(pop), BY_NAME[rec.relation].question.format(rec.subject),
                rec.answers, passage)


def build_wikidata(relations: Sequence[str] | None = None, limit: int | None = None, seed: int = 0,
                   per_subject: int = 1, n_options: int = 8, path: str | Path | None = None) -> list[Fact]:
    """Facts of the usable `relations` (all by default) in seeded order, kept leak-free and at most
    `per_subject` per subject up to `limit`: relations come in proportion to their facts."""
    if per_subject < 1 or n_options < 2:
        raise MergeabilityError(f"per_subject must be ≥ 1 and n_options ≥ 2, got {per_subject} and {n_options}")
    t = table(path)
    rels = set(_chosen(t, relations, n_options))
    records = [rec for rec in t.records if rec.relation in rels and _askable(rec, t, n_options)]
    order = seeding.rng(seed, "wikidata order").sample(records, len(records))
    return leak_free((_fact(rec, t) for rec in order), limit, per_subject=per_subject)
