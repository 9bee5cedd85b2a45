"""Task-level data (Lots-of-LoRAs layout): instruction tasks with train/valid/test splits, and task pools.

A task's rows are {"id", "input", "output"}: `input` is the whole prompt (definition, examples, instance),
`output` a list of accepted references (a single string is taken as a one-item list).

A local task is only its split files until a split is asked for (`SplitFiles`): a pool of many tasks holds paths,
and a split is read when it is used, as far as it is used (`Task.split(name, limit)` stops a JSONL file after
`limit` rows), and not kept. The Natural Instructions pool is 360 MB of JSONL; a survey uses a few MB of it.

A pool pairs tasks with adapters. Locally it is a directory

    POOL/datasets/task{NNN}_{slug}/{train,valid,test}.{jsonl,parquet}
    POOL/adapters/<any name ending in task{N}>/      (PEFT adapter directories; optional)

and on the hub it is the Lots-of-LoRAs organisation. Adapters and datasets are matched by task number, since
the zero-padding of the numbers differs between them (`…-task1` vs `task001_…`).

The hub pool loads what the organisation has adapters for: a dataset without one is skipped with a note (training
it is the explicit `train_missing`), and a listing of the whole organisation must be narrowed by a task list or a
`max_tasks` cap, the first tasks by number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from rich.console import Console

from mergeability.data.facts import read_rows
from mergeability.errors import MergeabilityError

SPLITS = ("train", "valid", "test")
HUB_ORG = "Lots-of-LoRAs"
HUB_ADAPTER = re.compile(r"^Mistral-7B-Instruct-v0\.2-4b-r16-task(\d+)$")
_NUMBER = re.compile(r"task0*(\d+)(?:_|$)")


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class SplitFiles(Mapping):
    """A local task's splits as their files: `files[split]` is read each time the split is asked for and nothing is
    kept (the caller holds what it uses), so a pool of many tasks costs only its paths; `head` reads a split's
    first rows only."""

    files: Mapping[str, Path]

    def __getitem__(self, split: str) -> list[Example]:
        return read_split(self.files[split])

    def __contains__(self, split: object) -> bool:  # Mapping's default would read the file to find out
        return split in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def head(self, split: str, limit: int | None) -> list[Example]:
        """The split's first `limit` rows (None: all), [] when the task has no such split."""
        return read_split(self.files[split], limit) if split in self.files else []


@dataclass
class Task:
    name: str  # e.g. task001_country_capital
    splits: Mapping[str, list[Example]]  # a dict of rows, or a local pool's SplitFiles (read when asked for)
    adapter: Path | None = None  # a PEFT adapter directory trained for this task, if the pool has one
    meta: dict = field(default_factory=dict)

    def rows(self, name: str, limit: int | None = None) -> list[Example]:
        """The split's rows, at most the first `limit` (None: all); [] when the task has no such split."""
        if isinstance(self.splits, SplitFiles):
            return self.splits.head(name, limit)
        return list(self.splits.get(name) or [])[:limit]

    def split(self, name: str, limit: int | None = None) -> list[Example]:
        """`rows`, where a missing or empty split is an error."""
        rows = self.rows(name, limit)
        if not rows:
            raise MergeabilityError(f"task {self.name} has no {name} split: add {name}.jsonl (or .parquet) to it")
        return rows


def task_number(name: str) -> int | None:
    """The N of 'task{N}' in a dataset or adapter name, whatever its zero-padding."""
    m = _NUMBER.search(name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def match_adapters(datasets: Sequence[str], adapters: Sequence[str]) -> dict[str, str]:
    """Dataset name → adapter name, by task number. Two adapters for one number is an error."""
    by_number: dict[int, str] = {}
    for a in adapters:
        n = task_number(a)
        if n is None:
            continue
        if n in by_number:
            raise MergeabilityError(f"two adapters for task {n}: {by_number[n]} and {a}; keep one")
        by_number[n] = a
    out = {}
    for d in datasets:
        n = task_number(d)
        if n is not None and n in by_number:
            out[d] = by_number[n]
    return out


def _example(row: dict, where: str, i: int) -> Example:
    for col in ("input", "output"):
        if col not in row or row[col] is None:
            raise MergeabilityError(f"{where}, row {i}: missing column {col!r} (a task row needs input and output)")
    if not isinstance(row["input"], str) or not row["input"].strip():
        raise MergeabilityError(f"{where}, row {i}, column 'input': must be a non-empty string")
    out = row["output"]
    out = [out] if isinstance(out, str) else list(out) if hasattr(out, "__iter__") else out  # Parquet: an array
    if not isinstance(out, list) or not out or not all(isinstance(o, str) for o in out):
        raise MergeabilityError(f"{where}, row {i}, column 'output': must be a string or a non-empty list of strings")
    return Example(str(row.get("id") or f"{i}"), row["input"], tuple(out))


def read_split(path: Path, limit: int | None = None) -> list[Example]:
    """A split file's rows, at most the first `limit` (None: all): a JSONL file is read no further than that."""
    with closing(read_rows(path)) as rows_read:  # closing the generator closes the file it stopped in
        rows = [_example(r, str(path), i) for i, r in islice(rows_read, limit)]
    if not rows:
        raise MergeabilityError(f"{path}: the file has no rows")
    return rows


def load_task_dir(path: Path) -> Task:
    """One task from a directory of split files, which are read when a split is used (`SplitFiles`); missing
    splits are left out (checked where they are used)."""
    files = {}
    for s in SPLITS:
        found = [p for p in (path / f"{s}.jsonl", path / f"{s}.parquet") if p.exists()]
        if found:
            files[s] = found[0]
    if not files:
        raise MergeabilityError(f"{path}: no split files: a task needs train/valid/test .jsonl or .parquet files")
    return Task(path.name, SplitFiles(files))


def load_local_pool(root: str | Path, tasks: Sequence[str] | None = None, max_tasks: int | None = None) -> list[Task]:
    """Tasks of a local pool directory (at most the first `max_tasks` by number), each with its adapter when the
    pool has one."""
    root = Path(root)
    ddir = root / "datasets"
    if not ddir.is_dir():
        raise MergeabilityError(f"{root} is not a task pool: it has no datasets/ directory (see docs/tasks.md)")
    names = sorted(p.name for p in ddir.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = first_tasks(select_tasks(names, tasks, str(root)), max_tasks)
    adir = root / "adapters"
    adapters = sorted(p.name for p in adir.iterdir() if p.is_dir()) if adir.is_dir() else []
    pairs = match_adapters(names, adapters)
    out = []
    for n in names:
        t = load_task_dir(ddir / n)
        t.adapter = adir / pairs[n] if n in pairs else None
        out.append(t)
    return out


def select_tasks(names: list[str], wanted: Sequence[str] | None, where: str) -> list[str]:
    if not names:
        raise MergeabilityError(f"{where}: the pool has no tasks")
    if not wanted:
        return names
    by_number = {task_number(n): n for n in names}
    out = []
    for w in wanted:
        hit = w if w in names else by_number.get(int(w) if w.strip().isdigit() else task_number(w))
        if hit is None:
            raise MergeabilityError(f"{where}: no task {w!r} in the pool")
        out.append(hit)
    return out


def first_tasks(names: Sequence[str], max_tasks: int | None) -> list[str]:
    """`names` by task number (a name without one last, by name), the first `max_tasks` of them (None: all)."""
    ordered = sorted(names, key=lambda n: (task_number(n) is None, task_number(n) or 0, n))
    return ordered if max_tasks is None else ordered[:max_tasks]


def with_adapters(names: Sequence[str], pairs: dict[str, str], max_tasks: int | None,
                  train_missing: bool) -> tuple[list[str], list[str]]:
    """(tasks to load, datasets skipped for having no adapter), walking `names` in order until `max_tasks` are
    taken: a skipped dataset does not use up the cap, so `max_tasks` N gives N tasks whenever the pool has them."""
    taken: list[str] = []
    skipped: list[str] = []
    for n in names:
        if max_tasks is not None and len(taken) == max_tasks:
            break
        (taken if train_missing or n in pairs else skipped).append(n)
    return taken, skipped


def print_note(text: str) -> None:
    """A note on stderr, as one line however long (a log keeps it whole)."""
    Console(stderr=True).print(text, markup=False, highlight=False, soft_wrap=True)


def skip_note(org: str, skipped: Sequence[str], shown: int = 20) -> str:
    """One line: how many datasets were skipped for having no adapter, and which (the first `shown` of them)."""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return (f"skipped {len(skipped)} {org} dataset{'s' if len(skipped) != 1 else ''} with no adapter in the "
            f"collection (pass --train-missing to train them): {names}")


def load_hub_pool(tasks: Sequence[str] | None = None, org: str = HUB_ORG, *, max_tasks: int | None = None,
                  train_missing: bool = False, note: Callable[[str], None] | None = None) -> list[Task]:
    """Lots-of-LoRAs from the Hugging Face hub: list the organisation, match adapters to datasets by number,
    download both. The tasks are `tasks` (None: every dataset), by number, at most the first `max_tasks` that are
    loaded; a dataset with no adapter is skipped, and `note` (default: stderr) is told once which were, unless
    `train_missing` keeps it for the run to train. Needs network, `huggingface_hub` and `datasets`."""
    try:
        import datasets
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise MergeabilityError("hub task pools need huggingface_hub and datasets: "
                                "pip install 'mergeability[hub]'") from None
    try:
        api = HfApi()
        adapters = [m.id.split("/", 1)[1] for m in api.list_models(author=org)]
        names = sorted(d.id.split("/", 1)[1] for d in api.list_datasets(author=org))
    except Exception as e:  # offline, rate-limited, …: one line is what the user needs
        raise MergeabilityError(f"cannot list {org} on the hub: {str(e).splitlines()[0]}") from None
    adapters = [a for a in adapters if HUB_ADAPTER.match(a)]
    names = first_tasks(select_tasks([n for n in names if task_number(n) is not None], tasks, org), None)
    pairs = match_adapters(names, adapters)
    names, skipped = with_adapters(names, pairs, max_tasks, train_missing)
    if skipped:
        (note or print_note)(skip_note(org, skipped))
    if not names:
        raise MergeabilityError(f"none of the {len(skipped)} {org} datasets selected has an adapter: pass "
                                "--train-missing to train them, or choose other --tasks")
    out = []
    for n in names:
        try:
            ds = datasets.load_dataset(f"{org}/{n}")
            adapter = Path(snapshot_download(f"{org}/{pairs[n]}")) if n in pairs else None
        except Exception as e:
            raise MergeabilityError(f"cannot load {org}/{n} from the hub: {str(e).splitlines()[0]}") from None
        splits = {s: [_example(r, f"{org}/{n} [{s}]", i) for i, r in enumerate(ds[s], start=1)]
                  for s in SPLITS if s in ds}
        out.append(Task(n, splits, adapter))
    return out
