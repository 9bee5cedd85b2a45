"""Where a task-level run's tasks come from: the bundled suite, the Lots-of-LoRAs hub, the Natural Instructions
tasks (converted offline from the bigbench sdist), or a pool directory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeability.data import natural_instructions
from mergeability.data.suite import TASKS, build_suite
from mergeability.data.tasks import Task, load_hub_pool, load_local_pool, select_tasks
from mergeability.errors import MergeabilityError


def load_pool(pool: str, tasks: Sequence[str] | None = None, *, seed: int = 0,
              sizes: Mapping[str, int] | None = None) -> list[Task]:
    """'bundled' (the offline suite), 'hub' (Lots-of-LoRAs), 'natural-instructions' (NI v1's 61 tasks, offline), or
    a local pool directory."""
    if pool == "bundled":
        return build_suite(select_tasks(list(TASKS), tasks, "the bundled suite"), seed=seed, **(sizes or {}))
    if pool == "hub":
        return load_hub_pool(tasks)
    if pool == natural_instructions.POOL:
        return load_local_pool(natural_instructions.pool_dir(), tasks)
    if not Path(pool).exists():
        raise MergeabilityError(f"unknown task pool {pool!r}: use bundled, hub, "
                                f"{natural_instructions.POOL}, or a pool directory")
    return load_local_pool(pool, tasks)
