"""Where a task-level run's tasks come from: the bundled suite, the Lots-of-LoRAs hub, the Natural Instructions
tasks (converted offline from the bigbench sdist), or a pool directory."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mergeability.data import natural_instructions
from mergeability.data.suite import TASKS, build_suite
from mergeability.data.tasks import HUB_ORG, Task, first_tasks, load_hub_pool, load_local_pool, select_tasks
from mergeability.errors import MergeabilityError


def load_pool(pool: str, tasks: Sequence[str] | None = None, *, seed: int = 0,
              sizes: Mapping[str, int] | None = None, max_tasks: int | None = None, train_missing: bool = False,
              note: Callable[[str], None] | None = None) -> list[Task]:
    """'bundled' (the offline suite), 'hub' (Lots-of-LoRAs), 'natural-instructions' (NI v1's 61 tasks, offline), or
    a local pool directory; `tasks` (None: all), at most the first `max_tasks` by task number. The hub's datasets
    without an adapter are skipped with a note (to `note`, default stderr) unless `train_missing`."""
    if pool == "bundled":
        names = first_tasks(select_tasks(list(TASKS), tasks, "the bundled suite"), max_tasks)
        return build_suite(names, seed=seed, **(sizes or {}))
    if pool == "hub":
        check_hub_selection(tasks, max_tasks)
        return load_hub_pool(tasks, max_tasks=max_tasks, train_missing=train_missing, note=note)
    if pool == natural_instructions.POOL:
        return load_local_pool(natural_instructions.pool_dir(), tasks, max_tasks)
    if not Path(pool).exists():
        raise MergeabilityError(f"unknown task pool {pool!r}: use bundled, hub, "
                                f"{natural_instructions.POOL}, or a pool directory")
    return load_local_pool(pool, tasks, max_tasks)


def check_hub_selection(tasks: Sequence[str] | None, max_tasks: int | None) -> None:
    """The hub pool with neither a task list nor a cap would list, download and run every dataset of the
    organisation (hundreds): refused before anything is fetched or written."""
    if not tasks and max_tasks is None:
        raise MergeabilityError(f"--pool hub would load every {HUB_ORG} dataset: name the tasks with --tasks "
                                "(e.g. --tasks 1,2,3) or cap them with --max-tasks N (the first N by task number)")
