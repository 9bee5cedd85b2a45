"""What every merge method shares: input checks, weights, and the provenance stamped on the result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import torch

from mergeability.errors import MergeabilityError
from mergeability.updates import LowRank, Update
from mergeability.version import __version__


def check_updates(updates: Sequence[Update]) -> dict[str, tuple[int, int]]:
    """Same base model, same shape per module, finite factors. Returns module name -> (out, in)."""
    if len(updates) == 0:
        raise MergeabilityError("nothing to merge: pass at least one update")
    bases = {u.base_model for u in updates if u.base_model}
    if len(bases) > 1:
        raise MergeabilityError(f"updates are for different base models: {', '.join(sorted(bases))}")
    shapes: dict[str, tuple[int, int]] = {}
    for i, u in enumerate(updates):
        for name, m in u.modules.items():
            if shapes.setdefault(name, m.shape) != m.shape:
                raise MergeabilityError(
                    f"module {name} has shape {m.shape} in update {i} but {shapes[name]} in another: "
                    "the updates are for different models"
                )
            tensors = (m.A, m.B) if isinstance(m, LowRank) else (m.weight,)
            if not all(torch.isfinite(t).all() for t in tensors) or not math.isfinite(getattr(m, "scale", 0.0)):
                raise MergeabilityError(f"module {name} of update {i} has NaN or infinite weights")
    return dict(sorted(shapes.items()))


def check_weights(weights: Sequence[float] | None, n: int, *, nonnegative: bool = True) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeabilityError(f"got {len(w)} weights for {n} updates: pass one weight per update")
    if not all(math.isfinite(x) for x in w):
        raise MergeabilityError("weights must be finite numbers")
    if nonnegative and (any(x < 0 for x in w) or sum(w) <= 0):
        raise MergeabilityError("weights must be non-negative with a positive sum")
    return w


def compute_dtype(updates: Sequence[Update]) -> torch.dtype:
    """float64 if any input is, else float32: merging in half precision loses the small entries TIES ranks."""
    dts = {m.dtype for u in updates for m in u.modules.values()}
    return torch.float64 if torch.float64 in dts else torch.float32


def output_dtype(updates: Sequence[Update]) -> torch.dtype:
    dts = [m.dtype for u in updates for m in u.modules.values()]
    return max(dts, key=lambda d: torch.finfo(d).bits)


def result(modules: dict, updates: Sequence[Update], method: str, params: dict, weights: list[float]) -> Update:

    dtype = output_dtype(updates)
    base = next((u.base_model for u in updates if u.base_model), None)
    meta = {
        "merge": {"method": method, "params": params, "weights": weights, "n_updates": len(updates)},
        "version": __version__,
    }
    return Update({k: m.to(dtype) for k, m in modules.items()}, base, meta)


def params_of(method) -> dict:
    return asdict(method)
