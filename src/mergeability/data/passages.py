"""Where a run's training passages come from (`data.passages` in the config, `--passages` on the command line).

- None: the dataset's own `passage` column; every fact of the run must have one (PopQA from the hub has none).
- A .jsonl/.parquet/.tsv/.csv file with columns `subj` and `passage` (or `subject` and `text`): one passage per
  subject, used as written (each non-empty line is one training sequence).
- `wikipedia`: the plain text of the subject's English Wikipedia page, fetched and cached (`data.wikipedia`).

A source replaces the dataset's own passages for every fact of the run. It is strict: if any subject of the run
has no passage, the run stops before anything is written, naming how many are missing and one of them, because
a run that silently trains on fewer (or other) items than asked is not the run that was configured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from mergeability.data.facts import Fact, read_rows
from mergeability.data.wikipedia import fetch_pages
from mergeability.errors import MergeabilityError

WIKIPEDIA = "wikipedia"
SUBJECT_COLUMNS = ("subj", "subject")
TEXT_COLUMNS = ("passage", "text")
SUFFIXES = (".jsonl", ".json", ".parquet", ".tsv", ".csv")
HOW = ("pass --passages FILE (a .jsonl/.parquet/.tsv file with columns subj, passage) or --passages wikipedia "
       "(each subject's Wikipedia page, fetched and cached)")


def check_passage_source(dataset: str, passages: str | None) -> None:
    """What can be checked before any data is loaded: PopQA from the hub brings no passages; a file must exist."""
    if passages is None:
        if dataset == "popqa":
            raise MergeabilityError(f"PopQA from the hub has no training passages: {HOW}")
        return
    if passages == WIKIPEDIA:
        return
    path = Path(passages)
    if path.suffix.lower() not in SUFFIXES:
        raise MergeabilityError(f"--passages {passages}: not a passages file (.jsonl/.parquet/.tsv/.csv) "
                                f"nor 'wikipedia': {HOW}")
    if not path.is_file():
        raise MergeabilityError(f"--passages {passages}: no such file: {HOW}")


def read_passages(path: str | Path) -> dict[str, str]:
    """Subject → passage from a passages file."""
    path = Path(path)
    out: dict[str, str] = {}
    first_row: dict[str, int] = {}
    columns = None
    for i, row in read_rows(path):
        columns = columns or _columns(path, row)
        subj, text = row.get(columns[0]), row.get(columns[1])
        if not isinstance(subj, str) or not subj.strip():
            raise MergeabilityError(f"{path}, row {i}: column {columns[0]!r} must hold the subject's name")
        if not isinstance(text, str) or not text.strip():
            raise MergeabilityError(f"{path}, row {i}: empty passage for {subj!r} in column {columns[1]!r}")
        if subj in out and out[subj] != text:
            raise MergeabilityError(f"{path}, row {i}: a second, different passage for {subj!r} (first in row "
                                    f"{first_row[subj]}): give one passage per subject")
        out.setdefault(subj, text)
        first_row.setdefault(subj, i)
    if columns is None:
        raise MergeabilityError(f"{path}: the passages file has no rows")
    return out


def _columns(path: Path, row: dict) -> tuple[str, str]:
    subj = next((c for c in SUBJECT_COLUMNS if c in row), None)
    text = next((c for c in TEXT_COLUMNS if c in row), None)
    if subj is None or text is None:
        need = "subj (or subject)" if subj is None else "passage (or text)"
        raise MergeabilityError(f"{path}: no column {need}; a passages file has columns subj, passage "
                                f"(found {', '.join(map(str, row)) or 'none'})")
    return subj, text


def with_passages(facts: Sequence[Fact], passages: str | None, dataset: str,
                  console: Console | None = None) -> list[Fact]:
    """`facts`, each with its training passage from `passages` (see the module doc); a one-line error if any
    fact is left without one."""
    check_passage_source(dataset, passages)
    if passages is None:
        lacking = [f for f in facts if not f.passage]
        if lacking:
            raise MergeabilityError(f"{dataset}: {len(lacking)} of {len(facts)} facts have no training passage "
                                    f"(e.g. {lacking[0].id}, subject {lacking[0].subj!r}): {HOW}")
        return list(facts)
    subjects = list(dict.fromkeys(f.subj for f in facts))
    if passages == WIKIPEDIA:
        pages = fetch_pages(subjects, console=console)
        texts, missing = pages.texts, [s for s in subjects if s not in pages.texts]
        if missing:
            raise MergeabilityError(f"{len(missing)} of {len(subjects)} subjects have no usable Wikipedia page "
                                    f"(e.g. {missing[0]!r}: {pages.missing.get(missing[0], 'no text')}): give "
                                    f"every subject's passage in a file instead (--passages FILE)")
    else:
        texts = read_passages(passages)
        missing = [s for s in subjects if s not in texts]
        if missing:
            raise MergeabilityError(f"{passages}: {len(missing)} of {len(subjects)} subjects of this run have no "
                                    f"passage (e.g. {missing[0]!r}): add a row (subj, passage) for each")
    return [dataclasses.replace(f, passage=texts[f.subj]) for f in facts]
