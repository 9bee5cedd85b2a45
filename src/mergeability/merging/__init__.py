"""Merge methods over Updates, in one explicit registry (no registration by import side effects)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mergeability.errors import MergeabilityError
from mergeability.merging.knots import Knots
from mergeability.merging.linear import Mean, TaskArithmetic
from mergeability.merging.ties import Ties
from mergeability.merging.weights import SCHEMES, base_accuracy_weights
from mergeability.updates import Update

METHODS: dict[str, type] = {"mean": Mean, "task_arithmetic": TaskArithmetic, "ties": Ties, "knots": Knots}


def get_method(name: str, **params):
    """An instance of the named method with typed parameters; unknown names or parameters are errors."""
    if name not in METHODS:
        raise MergeabilityError(f"unknown merge method {name!r}: choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise MergeabilityError(f"{name} takes no parameter {', '.join(unknown)} (it takes: {allowed})")
    return cls(**params)


def merge(updates: Sequence[Update], method: str = "knots", weights: Sequence[float] | None = None, **params) -> Update:
    """Merge `updates` with the named method; `weights` are per update (see each method for their meaning)."""
    return get_method(method, **params).merge(updates, weights)


__all__ = ["METHODS", "get_method", "merge", "Mean", "TaskArithmetic", "Ties", "Knots", "SCHEMES",
           "base_accuracy_weights"]
