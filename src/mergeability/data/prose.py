"""Training passages as prose: a short encyclopedia entry about one subject, built from every fact known about it.

The paper trains each update on the subject's Wikipedia page, text "in a different format from the evaluated
questions" (§4.2). So an entry states facts in declarative sentences, never as a question, in several wordings
per relation; each line of the entry (one training sequence) words all the facts differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mergeability.errors import MergeabilityError

LINES = 4  # lines per entry: each line is one training sequence and states every fact once


def entry(subject: str, facts: Sequence[tuple[str, str]], sentences: Mapping[str, Sequence[str]],
          lines: int = LINES) -> str:
    """`lines` lines about `subject`, each stating every (relation, object) fact once.

    `sentences[relation]` holds declarative wordings with `{s}` (subject) and `{o}` (object). Line j uses
    wording j (cycled) of each relation and starts at fact j (cycled), so no two lines read alike: a relation
    with as many wordings as there are lines is worded differently on every line. A line that would repeat an
    earlier one is left out.
    """
    if not facts:
        raise MergeabilityError(f"no facts about {subject!r} to write an entry from: give at least one")
    missing = sorted({r for r, _ in facts if not sentences.get(r)})
    if missing:
        raise MergeabilityError(f"no wording for relation {missing[0]!r}: add a sentence for it")
    out: list[str] = []
    for j in range(lines):
        start = j % len(facts)
        order = [*facts[start:], *facts[:start]]
        line = " ".join(_sentence(sentences[r], j, subject, o) for r, o in order)
        if line not in out:  # one fact with fewer wordings than lines would repeat a line: train on it once
            out.append(line)
    return "\n".join(out)


def _sentence(wordings: Sequence[str], j: int, subject: str, obj: str) -> str:
    text = wordings[j % len(wordings)].format(s=subject, o=obj)
    return text[0].upper() + text[1:]
