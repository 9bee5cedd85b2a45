"""What every merge method shares: input checks, weights, and the provenance stamped on the result."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
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


# ------------------------------------------------------------------------------------------- parameters
# A method's parameters are checked when it is constructed (each method's __post_init__), so a bad one is found
# where a run's config is read, not after its updates are trained.

_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", None: "null"}


def _kinds(tp) -> list:
    """What an annotation allows, as plain types, None and ("literal", value): `float | None` -> [float, None]."""
    if typing.get_origin(tp) is typing.Literal:
        return [("literal", a) for a in typing.get_args(tp)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [k for a in typing.get_args(tp) for k in _kinds(a)]
    return [None if tp is type(None) else tp]


def _fits(kind, value) -> bool:
    if isinstance(kind, tuple):
        return type(value) is type(kind[1]) and value == kind[1]
    if kind is None:
        return value is None
    if kind is float:  # an integer is a number; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _typed(method: str, key: str, value, tp):
    kinds = _kinds(tp)
    if float in kinds and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    for kind in kinds:
        if _fits(kind, value):
            return float(value) if kind is float else value
    allowed = " or ".join(repr(k[1]) if isinstance(k, tuple) else _WORDS.get(k, getattr(k, "__name__", str(k)))
                          for k in kinds)
    raise MergeabilityError(f"{method}: {key} takes {allowed}, got {value!r}")


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def check_params(method) -> None:
    """Every parameter of a method (a frozen dataclass) against its annotation, in place: a number is an int or a
    float, never a bool, and is stored as a float; an integer is not a bool; a choice is one of its Literal's
    values. A one-line error names the method, the parameter and what it takes. Ranges are each method's own."""
    hints = _hints(type(method))
    for f in dataclasses.fields(method):
        value = _typed(method.name, f.name, getattr(method, f.name), hints[f.name])
        object.__setattr__(method, f.name, value)  # frozen: set once, here, before anyone reads it


def check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise MergeabilityError(f"{key} must be a finite number > 0, got {value:g}")


def check_seed(value: int) -> None:
    if not 0 <= value < 2**63:  # torch generators take 64-bit seeds
        raise MergeabilityError(f"seed must be in [0, 2^63), got {value}")
