"""The task survey: per task of a pool, what one needs to know before choosing tasks for a task-level run — base
and fine-tuned exact-match accuracy, the majority-class rate, the mean prompt length, and the accuracy of the
adapter alone at each scale s of `SCALES`.

Training and evaluation are the task pipeline's (`adapter_for`, `task_accuracy`): the same `TaskConfig` gives the
same base and fine-tuned accuracy as `run tasks`. The adapter at scale s is s·ΔW (task arithmetic with λ = s on
the adapter alone), so s = 1 is the fine-tuned accuracy itself. `max_train` caps the examples an adapter is trained
on (the first of the train split; pool splits are shuffled, so a random sample). `base_only` is the quick screen
before that: base accuracy, majority rate and prompt length, no adapter trained (the other columns empty) — minutes
a task where training takes many on a CPU, and enough to tell whether a pool has any task its model already solves.

Majority-class rate: the accuracy of always giving the one answer that scores best, i.e. the largest share of
the evaluated test items whose references include one answer (after the scorer's normalisation). A task whose
base accuracy sits near it is solved by answering the majority, not by knowing anything.

The output directory holds survey.json (the settings and the rows so far: what a resume reads), survey.csv and
survey.md (the table) and updates/<task>/ (the trained adapters). The three files are rewritten atomically after
every task, so a killed survey resumes at the first task without a row; a directory surveyed with other settings
is refused rather than mixed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from mergeability.atomic import write_text
from mergeability.config import TaskConfig
from mergeability.console import print_table, progress
from mergeability.data.tasks import Example, Task
from mergeability.errors import MergeabilityError
from mergeability.exact_match import normalize_answer
from mergeability.merging.linear import TaskArithmetic
from mergeability.pipelines.stages import write_scores
from mergeability.pipelines.tasks import (
    PreparedTasks,
    adapter_for,
    in_memory,
    load_task_model,
    load_task_pool,
    task_accuracy,
)

SCALES = (0.1, 0.25, 0.5, 1.0)
SCALE_COLUMNS = [f"acc_s{s:g}" for s in SCALES]
COLUMNS = ["task", "n_train", "n_test", "majority_answer", "majority", "base_acc", "ft_acc", *SCALE_COLUMNS,
           "prompt_tokens", "train_loss"]
STATE = "survey.json"
# What the console shows: a narrow table (a terminal or a log is 80 columns wide), tasks by their number.
CONSOLE_COLUMNS = {"n_test": "n test", "majority": "maj.", "base_acc": "base", "ft_acc": "ft", "acc_s0.1": "s=.1",
                   "acc_s0.25": "s=.25", "acc_s0.5": "s=.5", "prompt_tokens": "tokens"}


def majority(examples: Sequence[Example]) -> tuple[str, float]:
    """(answer, rate): the normalised answer that the most examples accept, and the share that accept it. Ties
    go to the alphabetically first answer, so the result does not depend on the examples' order."""
    if not examples:
        raise MergeabilityError("no test examples: a majority rate needs at least one")
    counts = Counter(a for e in examples for a in {normalize_answer(r) for r in e.outputs})
    answer, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return answer, n / len(examples)


def settings(cfg: TaskConfig, max_train: int | None, base_only: bool = False) -> dict:
    """What decides a survey's numbers: a resumed survey must have the same (a screen is not a survey)."""
    m, d = cfg.model, cfg.data
    return {"pool": d.pool, "model": m.name, "revision": m.revision, "dtype": m.dtype, "max_test": d.max_test,
            "max_train": max_train, "max_new_tokens": d.max_new_tokens, "seed": cfg.seed,
            "training": cfg.training.to_dict(), "train_size": d.train_size, "test_size": d.test_size,
            # only a screen says so: a full survey written before screens existed still resumes
            **({"base_only": True} if base_only else {})}


def read_state(out: Path, wanted: dict) -> list[dict]:
    """The rows a survey in `out` already holds; [] for a new directory. Other settings are an error."""
    path = out / STATE
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise MergeabilityError(f"{out} exists and holds no {STATE}: give a new or empty --out for the survey")
        return []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        have, rows = state["settings"], state["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MergeabilityError(f"{path} is not a survey state file: delete it, or give another --out") from None
    differ = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
    if differ:
        raise MergeabilityError(f"{out} holds a survey with other settings ({', '.join(differ)}): give another --out, "
                                "or the same settings to resume it")
    return rows


def markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_state(out: Path, wanted: dict, rows: list[dict]) -> None:
    """survey.json, survey.csv and survey.md, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / STATE, json.dumps({"settings": wanted, "rows": rows}, indent=1))
    write_scores(out / "survey.csv", COLUMNS, rows)
    write_text(out / "survey.md", markdown(COLUMNS, rows))


def prepare_survey(cfg: TaskConfig, max_train: int | None = None, base_only: bool = False) -> PreparedTasks:
    """The pool and the model, checked before any work, as `run tasks` checks them, and the train rows the survey
    will use (at most `max_train` a task; read and let go; none for a screen). A survey trains every task it lists
    (that is what it measures), so the hub's adapter-less datasets are kept."""
    tasks = load_task_pool(cfg, train_missing=True)
    for t in tasks:
        if t.adapter is None and not base_only:
            t.split("train", max_train)
    lm, modules = load_task_model(cfg, tasks)
    return PreparedTasks(cfg, lm, tasks, modules)


def survey_task(prep: PreparedTasks, task: Task, out: Path, max_train: int | None, base_only: bool = False) -> dict:
    """One task's row: base accuracy, majority rate, mean prompt tokens and, unless `base_only`, an adapter (the
    pool's, or trained on at most `max_train` examples), its fine-tuned accuracy and its accuracy at each scale."""
    cfg, model, tok = prep.cfg, prep.lm.model, prep.lm.tokenizer
    # A pool adapter's task needs no train rows: the survey does not record the perplexity adapter_for measures on them.
    task = in_memory(cfg, task, train=task.adapter is None and not base_only, max_train=max_train)
    test = task.splits["test"]
    answer, rate = majority(test)
    row = {c: None for c in COLUMNS} | {
        "task": task.name, "n_train": len(task.splits["train"]) if "train" in task.splits else None,
        "n_test": len(test), "majority_answer": answer, "majority": rate,
        "base_acc": task_accuracy(cfg, model, tok, task)[0],
        "prompt_tokens": sum(len(tok(e.input).input_ids) for e in test) / len(test)}
    if base_only:
        return row
    update, row["train_loss"], _, _ = adapter_for(prep, task, out)
    row["ft_acc"] = row["acc_s1"] = task_accuracy(cfg, model, tok, task, update)[0]  # s = 1 is the fine-tuned model
    for s in (s for s in SCALES if s != 1.0):  # s·ΔW alone
        row[f"acc_s{s:g}"] = task_accuracy(cfg, model, tok, task, TaskArithmetic(lam=s).merge([update]))[0]
    return row


def run_survey(cfg: TaskConfig, out: Path, *, max_train: int | None = None, base_only: bool = False,
               console: Console | None = None) -> list[dict]:
    """Survey every task of `cfg.data.pool` (or `cfg.data.tasks`) into `out`, resuming what is there; the rows.
    `base_only`: the screen without adapters (see the module docstring)."""
    console = console or Console()
    for flag, value in (("--max-train", max_train), ("--max-test", cfg.data.max_test)):
        if value is not None and value < 1:
            raise MergeabilityError(f"{flag} must be at least 1, got {value}")
    if base_only and max_train is not None:  # a cap that changes nothing would still split the settings
        raise MergeabilityError("--max-train has no effect with --base-only (a screen trains no adapter): drop it")
    wanted = settings(cfg, max_train, base_only)
    rows = read_state(out, wanted)
    prep = prepare_survey(cfg, max_train, base_only)
    done = {r["task"] for r in rows}
    with progress(console) as bars:
        bar = bars.stage("survey", len(prep.tasks), len(done & {t.name for t in prep.tasks}))
        for task in (t for t in prep.tasks if t.name not in done):
            rows.append(survey_task(prep, task, out, max_train, base_only))
            write_state(out, wanted, rows)
            bar.advance()
    names = [t.name for t in prep.tasks]
    shown = sorted((r for r in rows if r["task"] in names), key=lambda r: names.index(r["task"]))
    print_table(console, f"survey of {cfg.data.pool} on {cfg.model.name} (full names in {out / 'survey.md'})",
                ["task", *CONSOLE_COLUMNS.values()], [_console_row(r) for r in shown])
    return shown


def _console_row(r: dict) -> list[str]:
    cells = [f"{r[c]:.0f}" if c == "prompt_tokens" else f"{r[c]:.2f}" if isinstance(r[c], float) else _cell(r[c])
             for c in CONSOLE_COLUMNS]
    return [r["task"].split("_", 1)[0], *cells]
