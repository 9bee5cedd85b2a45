"""Weighting schemes: per-update weights that any merge method takes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from mergeability.errors import MergeabilityError


def base_accuracy_weights(accuracies: Sequence[float], temperature: float = 1.0) -> list[float]:
    """§6 of the paper: softmax((1 − acc_i) / T), so updates the base model knows least weigh most."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise MergeabilityError(f"temperature must be > 0, got {temperature}")
    acc = [float(a) for a in accuracies]
    if not acc or any(not (0.0 <= a <= 1.0) for a in acc):
        raise MergeabilityError("base accuracies must be numbers in [0, 1], one per update")
    logits = [(1.0 - a) / temperature for a in acc]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]  # shifted for stability at small T
    total = sum(exp)
    return [e / total for e in exp]


SCHEMES = {"base_accuracy": base_accuracy_weights}
