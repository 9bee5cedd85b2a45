"""Linear merges, kept exactly low-rank: Σ c_i s_i B_i A_i = [c_1 s_1 B_1 | … ] @ [A_1; …]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergeability.merging.base import (
    check_params,
    check_positive,
    check_updates,
    check_weights,
    compute_dtype,
    params_of,
    result,
)
from mergeability.updates import Dense, LowRank, Update


def linear_combination(updates: Sequence[Update], coefs: Sequence[float], dense: bool = False) -> dict:
    """Σ c_i ΔW_i per module; a module absent from an update counts as ΔW = 0 there. Low-rank inputs give a
    low-rank result (factors concatenated), unless `dense` asks for the obvious sum of materialised ΔW_i."""
    dtype = compute_dtype(updates)
    out = {}
    for name in check_updates(updates):
        terms = [(c, u.modules[name].to(dtype)) for c, u in zip(coefs, updates) if name in u.modules]
        if not dense and all(isinstance(m, LowRank) for _, m in terms):
            A = torch.cat([m.A for _, m in terms], 0)
            B = torch.cat([(c * m.scale) * m.B for c, m in terms], 1)
            out[name] = LowRank(A, B, 1.0)
        else:
            out[name] = Dense(sum(c * m.delta() for c, m in terms))
    return out


@dataclass(frozen=True)
class Mean:
    """Weighted mean of ΔW (never of A and B separately: that would add cross terms)."""

    name = "mean"

    def merge(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        return self._merge(updates, weights, dense=False)

    def reference(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        """The obvious route, for checking: the weighted mean of the materialised ΔW_i."""
        return self._merge(updates, weights, dense=True)

    def _merge(self, updates: Sequence[Update], weights: Sequence[float] | None, dense: bool) -> Update:
        w = check_weights(weights, len(updates))
        coefs = [x / sum(w) for x in w]
        return result(linear_combination(updates, coefs, dense), updates, self.name, params_of(self), w)


@dataclass(frozen=True)
class TaskArithmetic:
    """λ · Σ w_i ΔW_i (Ilharco et al., 2023)."""

    lam: float = 1.0  # scaling of the summed task vectors

    name = "task_arithmetic"

    def __post_init__(self) -> None:
        check_params(self)
        check_positive("lam", self.lam)  # to negate an update, give it a negative weight

    def merge(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        return self._merge(updates, weights, dense=False)

    def reference(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        """The obvious route, for checking: λ times the weighted sum of the materialised ΔW_i."""
        return self._merge(updates, weights, dense=True)

    def _merge(self, updates: Sequence[Update], weights: Sequence[float] | None, dense: bool) -> Update:
        w = check_weights(weights, len(updates), nonnegative=False)
        coefs = [self.lam * x for x in w]
        return result(linear_combination(updates, coefs, dense), updates, self.name, params_of(self), w)
