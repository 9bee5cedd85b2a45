"""PopQA-schema rows ("facts") from the hub, local TSV/JSONL/Parquet files, or the bundled `geo` builder."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mergeability.errors import MergeabilityError, one_line

REQUIRED = ("id", "subj", "prop", "obj", "s_pop", "question", "possible_answers")
HUB_POPQA = "akariasai/PopQA"


@dataclass(frozen=True)
class Fact:
    id: str
    subj: str
    prop: str  # the relation, e.g. "capital"
    obj: str  # the gold answer
    s_pop: float  # subject popularity (PopQA: Wikipedia page views; geo: population)
    question: str
    possible_answers: tuple[str, ...]  # the gold and its aliases
    passage: str | None = None  # training text about the subject


def _fact_from_row(row: dict, where: str) -> Fact:
    missing = [c for c in REQUIRED if c not in row or row[c] is None or row[c] == ""]
    if missing:
        raise MergeabilityError(f"{where}: missing column {missing[0]!r} (PopQA schema needs {', '.join(REQUIRED)})")
    answers = row["possible_answers"]
    if isinstance(answers, str):
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError:
            raise MergeabilityError(f"{where}, column 'possible_answers': not a JSON list: {answers[:40]!r}") from None
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise MergeabilityError(f"{where}, column 'possible_answers': must be a list of strings")
    try:
        pop = float(row["s_pop"])
    except (TypeError, ValueError):
        raise MergeabilityError(f"{where}, column 's_pop': not a number: {row['s_pop']!r}") from None
    passage = row.get("passage") or None
    return Fact(str(row["id"]), str(row["subj"]), str(row["prop"]), str(row["obj"]), pop, str(row["question"]),
                tuple(answers), passage)


def read_rows(path: Path) -> Iterable[tuple[int, dict]]:
    """(row number, row) of a .tsv/.csv/.jsonl/.parquet file, each row a mapping of column to value. A file that
    cannot be read (not UTF-8, a directory, no permission) or a JSON line that is not an object is a one-line error
    here, for every reader (facts, passages, task splits)."""
    try:
        yield from _rows(path)
    except (OSError, UnicodeDecodeError) as e:
        raise MergeabilityError(f"{path}: cannot read the file ({one_line(e)})") from None


def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), start=2)
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise MergeabilityError(f"{path}, row {i}: invalid JSON ({e.msg})") from None
                    if not isinstance(row, dict):  # a bare number, string or list: every reader wants columns
                        raise MergeabilityError(f"{path}, row {i}: expected a JSON object of columns, got "
                                                f"{type(row).__name__} {line.strip()[:40]!r}")
                    yield i, row
    elif suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise MergeabilityError("reading Parquet needs pandas and pyarrow: pip install pandas pyarrow") from None
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as e:  # pyarrow's errors are both kinds
            raise MergeabilityError(f"{path}: cannot read the Parquet file ({one_line(e)})") from None
        yield from enumerate(frame.to_dict("records"), start=1)
    else:
        raise MergeabilityError(f"{path}: unknown file type {suffix!r}: use .tsv, .csv, .jsonl or .parquet")


def load_file(path: str | Path) -> list[Fact]:
    """Every row of a PopQA-schema file as a Fact; a one-line error for a file that cannot be read, a row that
    does not fit the schema, or an id used twice (ids key the run's store)."""
    path = Path(path)
    if not path.exists():
        raise MergeabilityError(f"{path}: no such dataset file")
    if not path.is_file():
        raise MergeabilityError(f"{path} is a directory, not a dataset file")
    facts: list[Fact] = []
    first: dict[str, int] = {}
    for i, row in read_rows(path):
        facts.append(_fact_from_row(row, f"{path}, row {i}"))
        if first.setdefault(facts[-1].id, i) != i:
            raise MergeabilityError(f"{path}, row {i}: id {facts[-1].id!r} repeats row {first[facts[-1].id]}: "
                                    "give every fact its own id")
    if not facts:
        raise MergeabilityError(f"{path}: the file has no rows")
    return facts


def load_hub(name: str = HUB_POPQA, split: str = "test") -> list[Fact]:
    """PopQA from the Hugging Face hub (needs network and the `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise MergeabilityError("loading PopQA from the hub needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, …: one line is what the user needs
        raise MergeabilityError(f"cannot load {name} from the hub: {str(e).splitlines()[0]}") from None
    return [_fact_from_row(row, f"{name}, row {i}") for i, row in enumerate(ds, start=1)]
