"""The `natural-instructions` task pool: the 61 tasks of Natural Instructions v1 (Mishra et al., 2022; Apache-2.0),
which are tasks 001–061 of Super-NaturalInstructions and of Lots-of-LoRAs, offline.

Source: the copy inside the bigbench 1.0.0 sdist (`bigbench.NATURAL_INSTRUCTIONS`), one BIG-bench JSON task per
subtask, `subtask{NNN}_{slug}/task.json`: `task_prefix` holds the NI v1 instruction ("Definition: … Things to
Avoid: … Emphasis/Caution: … Prompt: …") and `examples` the instances, {"input", "target": [accepted outputs]}
(193,250 of them, 58–6,500 a task). It carries no positive or negative examples.

Each task becomes a directory of the local pool layout (`data/tasks.py`):
- name: Lots-of-LoRAs' (= Super-NaturalInstructions') `task{NNN}_{slug}`, the subtask's name without "sub", except
  the two that Super-NaturalInstructions renamed (`RENAMED`);
- prompt: Super-NaturalInstructions' definition-only encoding as Lots-of-LoRAs' datasets write it (`prompt`).
  The instruction's whitespace is collapsed and it gets a final period when it ends without punctuation (the SNI
  collator's rule); the input is kept as written (Lots-of-LoRAs adds no period). SNI ends with "Output: "; here
  the space belongs to the answer, which training and scoring prefix with " ";
- references: every non-empty target, in order, repeats dropped (exact match accepts any); an instance with none
  is dropped;
- splits: 80/10/10 of a shuffle seeded by the task's name alone, so a task splits the same way whichever tasks
  are converted and in whatever order; rows keep the shuffled order, so a split's first rows are a random sample.

The converted pool is written whole (atomically) to `cache_dir()/natural-instructions-pool-{FORMAT}` with a
manifest of its files' sizes; a later use checks the sizes and loads at once: paths only, a task's split files being
read when a run uses them and only as far as it does (`data.tasks.SplitFiles`). Bump `FORMAT` when the conversion
changes, so cached pools are rebuilt.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mergeability import seeding
from mergeability.atomic import atomic_dir
from mergeability.data.bigbench import NATURAL_INSTRUCTIONS, bigbench_folder
from mergeability.errors import MergeabilityError
from mergeability.fetch import cache_dir

POOL = "natural-instructions"  # the pool's name for `--pool`
FORMAT = 1  # version of the conversion below
RENAMED = {46: "task046_miscellaneous_question_typing",  # NI v1: subtask046_miscellaenous_question_typing
           47: "task047_miscellaneous_answering_science_questions"}  # NI v1: subtask047_misc_answering_…
SUBTASK = re.compile(r"^subtask(\d{3})_(\w+)$")
SHARES = (("valid", 0.1), ("test", 0.1))  # the rest is train
MANIFEST = "manifest.json"


def task_name(subtask: str) -> str:
    """Lots-of-LoRAs' name of an NI v1 subtask directory: 'subtask001_quoref_question_generation' →
    'task001_quoref_question_generation'."""
    m = SUBTASK.match(subtask)
    if m is None:
        raise MergeabilityError(f"{subtask!r} is not an NI v1 subtask name (subtask{{NNN}}_{{slug}})")
    return RENAMED.get(int(m.group(1)), subtask.removeprefix("sub"))


def instruction(task_prefix: str) -> str:
    """The 'Definition: …' line of the prompt from a task's NI v1 instruction."""
    text = " ".join(task_prefix.split())
    if not text.startswith("Definition:"):
        text = "Definition: " + text
    return text if text[-1] in string.punctuation else text + "."


def prompt(definition: str, x: str) -> str:
    """A Lots-of-LoRAs prompt: definition, then the instance (the answer follows after a space)."""
    return f"{definition}\n\nNow complete the following example -\nInput: {x.strip()}\nOutput:"


def _references(target: object) -> tuple[str, ...] | None:
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    return tuple(dict.fromkeys(t.strip() for t in targets if t.strip()))


@dataclass(frozen=True)
class Subtask:
    """One NI v1 task.json as read: its definition line and its usable instances."""

    definition: str
    rows: tuple[tuple[int, str, tuple[str, ...]], ...]  # (index in the file, input, references)
    total: int  # instances in the file, the unusable (no non-empty reference) included


def read_subtask(path: Path) -> Subtask:
    """One subtask's task.json; instances with no non-empty reference are left out of `rows`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prefix, examples = data["task_prefix"], data["examples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeabilityError(f"{path}: not a BIG-bench task.json with 'task_prefix' and 'examples' "
                                f"({type(e).__name__}); delete the cached folder to extract it again") from None
    if not isinstance(prefix, str) or not prefix.strip() or not isinstance(examples, list):
        raise MergeabilityError(f"{path}: 'task_prefix' must be a non-empty string and 'examples' a list")
    rows = []
    for i, ex in enumerate(examples):
        x = ex.get("input") if isinstance(ex, dict) else None
        refs = _references(ex.get("target")) if isinstance(ex, dict) else None
        if not isinstance(x, str) or not x.strip() or refs is None:
            raise MergeabilityError(f"{path}, example {i + 1}: needs a string 'input' and a string or list 'target'")
        if refs:
            rows.append((i, x, refs))
    return Subtask(instruction(prefix), tuple(rows), len(examples))


def split_sizes(n: int, where: str) -> dict[str, int]:
    """Rows per split: 10 % valid, 10 % test (at least one each), the rest train."""
    sizes = {s: max(1, round(n * share)) for s, share in SHARES}
    sizes = {"train": n - sum(sizes.values()), **sizes}
    if sizes["train"] < 1:
        raise MergeabilityError(f"{where}: {n} usable instances; a task needs at least 3 (train, valid, test)")
    return sizes


def split_rows(name: str, rows) -> dict[str, list]:
    """`rows` shuffled by a seed of the task's name alone, then cut 80/10/10 (train, valid, test)."""
    order = seeding.rng(0, "natural-instructions split", name).sample(rows, len(rows))
    out, start = {}, 0
    for split, size in split_sizes(len(rows), name).items():
        out[split], start = order[start : start + size], start + size
    return out


def convert_task(source: Path, dest: Path) -> dict:
    """One subtask directory → `dest/datasets/<name>/{train,valid,test}.jsonl`; what was written, by split."""
    name = task_name(source.name)
    sub = read_subtask(source / "task.json")
    tdir = dest / "datasets" / name
    tdir.mkdir(parents=True)
    counts = {}
    for split, part in split_rows(name, sub.rows).items():
        with (tdir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for i, x, refs in part:
                row = {"id": f"{name}-{i}", "input": prompt(sub.definition, x), "output": list(refs)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[split] = len(part)
    return {name: {**counts, "dropped": sub.total - len(sub.rows)}}


def convert(source: Path, dest: Path) -> dict:
    """Every subtask under `source` (an NI v1 folder) into the pool directory `dest`; returns the manifest."""
    subtasks = sorted(p for p in source.iterdir() if p.is_dir() and SUBTASK.match(p.name))
    if not subtasks:
        raise MergeabilityError(f"{source}: no subtask{{NNN}}_{{slug}} folders: not a Natural Instructions folder")
    tasks: dict[str, dict] = {}
    for s in subtasks:
        tasks.update(convert_task(s, dest))
    files = {p.relative_to(dest).as_posix(): p.stat().st_size for p in sorted(dest.rglob("*.jsonl"))}
    manifest = {"format": FORMAT, "source": str(source), "tasks": tasks, "files": files}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def intact(root: Path) -> bool:
    """Whether `root` is a converted pool of this `FORMAT` whose files all have the sizes its manifest records."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return manifest["format"] == FORMAT and bool(files) and all(
            (root / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def pool_dir(console: Console | None = None) -> Path:
    """The converted pool directory: cached, or converted now from the bigbench sdist (fetched on first use)."""
    root = cache_dir() / f"{POOL}-pool-{FORMAT}"
    if intact(root):
        return root
    source = bigbench_folder(NATURAL_INSTRUCTIONS, console)
    (console or Console(stderr=True)).print(f"converting the Natural Instructions tasks into {root}",
                                            highlight=False, soft_wrap=True)
    with atomic_dir(root, replace=True) as tmp:
        convert(source, tmp)
    return root
