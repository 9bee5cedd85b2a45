"""What every experiment works with: a finished run reopened (config, store, prepared model and data), and the
two kinds of work it adds: more trials under other settings, and merges of chosen sets of updates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergeability import run
from mergeability.backends import pool_for
from mergeability.config import override
from mergeability.console import progress
from mergeability.errors import MergeabilityError
from mergeability.estimate import merge_set_job, params_key
from mergeability.pipelines import PIPELINES, worker_setup
from mergeability.pipelines.examples import subjects
from mergeability.pipelines.stages import trials_stage

REPEATS = 3  # random draws per setting of the groups experiment (locality sets its own)


@dataclass
class Context:
    """A finished run, reopened (and locked) for an experiment."""

    run_dir: Path
    cfg: object
    store: object
    prep: object = None  # built on demand: loading the model is the expensive part

    def prepared(self):
        if self.prep is None:
            self.prep = PIPELINES[self.cfg.kind][0](self.cfg)
        return self.prep

    def evaluator(self):
        return PIPELINES[self.cfg.kind][1](self.prepared())

    def groups(self) -> dict[str, str] | None:
        """Update id -> subject in an example-level run (merged updates never share one, as in its trials);
        None in a task-level run, whose tasks share nothing."""
        return subjects(self.prepared()) if self.cfg.kind == "examples" else None


def open_context(run_dir: Path, overrides: dict) -> Context:
    """The run in `run_dir`, its config changed by `overrides` (how it runs, not what)."""
    cfg, store = run.open_run(run_dir)
    return Context(Path(run_dir), override(cfg, **overrides), store)


def kept_updates(ctx: Context) -> dict:
    """An example-level run's kept updates of its own items, loaded, by id."""
    kept = run.load_kept(ctx.store, ctx.run_dir, {it.id for it in ctx.prepared().items})
    if len(kept) <= ctx.cfg.merge.partners:
        raise MergeabilityError(f"{ctx.run_dir} has {len(kept)} kept updates: finish the run first (--resume)")
    return kept


def main_scores(ctx: Context, updates: dict) -> dict[str, float]:
    """The run's own scores of `updates`; a one-line error unless every one has all its trials."""
    sc = run.scores(ctx.store, run.run_key(ctx.cfg), sorted(updates), ctx.cfg.merge.trials, complete=True)
    if set(sc) != set(updates):
        raise MergeabilityError("the run's trials are not finished: --resume it first")
    return sc


def add_trials(ctx: Context, updates: dict, label: str, console, *, method: str, params: dict, trials: int,
               partners: int, targets: Sequence[str] | None = None, first_trial: int = 0) -> None:
    """The run's trials again under another method, parameters, M or N (same seeds and groups, so same
    partners), for `targets` (default: every update; partners are drawn from all of them either way); trials
    from `first_trial` on only (see trials_stage)."""
    cfg = ctx.cfg
    key = params_key(method, {**params, "partners": partners})
    targets = sorted(updates if targets is None else targets)
    with progress(console) as bars:
        trials_stage(cfg, ctx.store, worker_setup(cfg), ctx.evaluator(), updates, targets, key, bars, label,
                     method=method, params=params, trials=trials, partners=partners, chunk=cfg.batch_rows,
                     reference=cfg.engine == "plain", groups=ctx.groups(), first_trial=first_trial)


def run_merge_sets(ctx: Context, name: str, units: Sequence[tuple[str, dict]], updates: dict, console,
                   payload: Callable[[dict], tuple], result: Callable[[tuple, list], dict]) -> int:
    """Merge each unit's set once and evaluate every member under that merge; store `result(payload, outcomes)`
    under (name, unit key). `payload(unit)` = (method, params, members, weights, reference). Resumes: returns
    how many units ran now (the others were in the store)."""
    done = ctx.store.experiment_rows(name)
    todo = [(key, unit) for key, unit in units if key not in done]
    payloads = [payload(unit) for _, unit in todo]
    with progress(console) as bars, pool_for(ctx.cfg, worker_setup(ctx.cfg), ctx.evaluator(), updates) as workers:
        bar = bars.stage(name, len(units), len(units) - len(todo))
        for i, outcomes in workers.map(merge_set_job, payloads):
            ctx.store.add_experiment(name, todo[i][0], result(payloads[i], outcomes))
            bar.advance()
    return len(todo)
