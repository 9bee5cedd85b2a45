"""What both kinds of run share: the trials stage, the worker setup, the scores file.

An evaluator is `evaluate(trials, merged) -> [Outcome]`: each trial's target evaluated with its merged update.
The example-level run's outcome is 0/1 (the item answered correctly) with the option probabilities; the
task-level run's is the task's exact-match accuracy with each test example's correctness.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeability.atomic import atomic_file
from mergeability.backends import pool_for
from mergeability.errors import MergeabilityError, one_line
from mergeability.estimate import plan_trials, run_trials
from mergeability.models import LoadedModel, load_model
from mergeability.store import Store


@dataclass(frozen=True)
class Outcome:
    correct: float  # 0/1 for an item; exact-match accuracy for a task
    detail: tuple  # option probabilities of an item; per-example correctness (0/1) of a task


@dataclass(frozen=True)
class WorkerSetup:
    """Builds, inside a worker, the evaluator of a run: `evaluator(prepare(cfg))`. Picklable (module-level
    functions and a config), so Ray actors can build their own copy of the model once."""

    cfg: object
    prepare: Callable
    evaluator: Callable

    def __call__(self):
        cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, threads=None))
        return self.evaluator(self.prepare(cfg))  # a worker keeps the threads its backend gave it


def load_run_model(m) -> LoadedModel:
    """The run's model and tokenizer (`m`: the config's model section), loaded in the prepare step; a checkpoint
    transformers cannot read becomes one line."""
    try:
        return load_model(m.name, dtype=m.dtype, device=m.device, revision=m.revision)
    except (OSError, ValueError) as e:
        if isinstance(e, MergeabilityError):
            raise
        raise MergeabilityError(f"cannot load model {m.name!r}: {one_line(e)}") from None


def trials_stage(cfg, store: Store, setup: WorkerSetup, evaluate, updates: Mapping, targets: Sequence[str],
                 key: str, bars, label: str, *, method: str | None = None, params: Mapping | None = None,
                 trials: int | None = None, partners: int | None = None, chunk: int = 1,
                 reference: bool = False, groups: Mapping[str, str] | None = None, first_trial: int = 0) -> None:
    """M trials per target, each merging it with N partners drawn from `targets`, recorded under `key`; the
    method, its parameters, M and N default to the run's own. `groups` (id -> subject): partners never share
    the target's group. Resumes: recorded trials are skipped. `first_trial`: plan trials from that index on only,
    for a stage that extends trials recorded before it (more M): run_trials re-evaluates every chunk of the plan
    that holds a new trial, and planned with the old ones interleaved nearly every chunk does (twice the work)."""
    m = cfg.merge
    method = m.method if method is None else method
    params = m.params if params is None else params
    plan = [t for t in plan_trials(cfg.seed, targets, targets, m.trials if trials is None else trials,
                                   m.partners if partners is None else partners, groups) if t.trial >= first_trial]
    done = store.done_trials(method, key)
    bar = bars.stage(label, len(plan), sum((p.target, p.trial) in done for p in plan))

    def record(trial, outcome: Outcome) -> None:
        store.add_trial(dict(target=trial.target, trial=trial.trial, method=method, params=key,
                             partners=list(trial.partners), correct=outcome.correct, probs=list(outcome.detail)))
        bar.advance()

    with pool_for(cfg, setup, evaluate, updates) as workers:
        run_trials(plan, updates, method, params, evaluate, record, done, chunk=chunk, pool=workers,
                   reference=reference)


def safe_name(update_id: str) -> str:
    """A directory name for an update or task id (item ids hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", update_id)


def finish(out: Path, store: Store, timings: Mapping, columns: Sequence[str], rows: Sequence[Mapping]) -> dict:
    """A run's last step: scores.csv written, the stage timings recorded, the store closed. Returns the timings."""
    write_scores(out / "scores.csv", columns, rows)
    store.set_meta("timings", dict(timings))
    store.close()
    return dict(timings)


def write_scores(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    """The scores file: one row per scored update, floats to 6 significant digits. Written atomically."""
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else v  # noqa: E731
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(v) for k, v in r.items()})
