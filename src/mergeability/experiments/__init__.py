"""The paper's follow-up experiments over a finished run. Each one is a frozen dataclass (its parameters are its
fields, checked on construction) with a `name`, the `kind` of run it needs, and `run(ctx, console)`, which adds
units of work to the run's store and writes rows only: tables, figures and verdicts are the report's.
Every experiment resumes. Adding one = a module here + one line in `EXPERIMENTS` + a known-answer test.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mergeability.errors import MergeabilityError
from mergeability.experiments.algorithms import Algorithms
from mergeability.experiments.context import open_context
from mergeability.experiments.groups import Groups
from mergeability.experiments.knots_settings import KnotsSettings
from mergeability.experiments.locality import Locality
from mergeability.experiments.robustness import Robustness
from mergeability.experiments.weighted import Weighted
from mergeability.run import check_writable, run_config

EXPERIMENTS: dict[str, type] = {
    "algorithms": Algorithms,
    "robustness": Robustness,
    "locality": Locality,
    "groups": Groups,
    "weighted": Weighted,
    "knots-settings": KnotsSettings,
}


def get_experiment(name: str, **params):
    if name not in EXPERIMENTS:
        raise MergeabilityError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name](**params)


def run_experiment(experiment, run_dir: Path, console: Console | None = None, overrides: dict | None = None) -> None:
    """Run `experiment` (an instance, or a name with default parameters) on the finished run in `run_dir`;
    `overrides` (flat names: backend, ray_address, workers) change how it runs, not what."""
    if isinstance(experiment, str):
        experiment = get_experiment(experiment)
    kind = run_config(Path(run_dir)).kind  # reads only: a directory that is not a run, or of the wrong kind, is
    if kind != experiment.kind:  # refused before the lock (or anything else) is written there
        others = [n for n, c in EXPERIMENTS.items() if c.kind == kind]
        raise MergeabilityError(f"{run_dir} is a {kind} run: {experiment.name} needs a {experiment.kind} "
                                f"run (experiments for this run: {', '.join(others)})")
    check_writable(Path(run_dir), f"experiment {experiment.name}")
    ctx = open_context(Path(run_dir), overrides or {})
    try:
        experiment.run(ctx, console or Console())
    finally:
        ctx.store.close()


__all__ = ["EXPERIMENTS", "get_experiment", "run_experiment", "Algorithms", "Robustness", "Locality", "Groups",
           "Weighted", "KnotsSettings"]
