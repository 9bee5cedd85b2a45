"""KnOTS (Stoica et al., ICLR 2025): align updates in a shared SVD basis, then merge there.

Per module, [ΔW_1 | … | ΔW_n] = U Σ [V_1ᵀ … V_nᵀ]; the blocks R_i = Σ V_iᵀ are merged (TIES or mean) and the
result is U · R_merged. All of it is computed from the LoRA factors: with ΔW_i = B_i A_i,

    [ΔW_1 | … ] = B_cat · blockdiag(A_i),   B_cat = Q R (thin QR),   A_iᵀ = Q_i P_i (thin QR)
               = Q · (R · blockdiag(P_iᵀ)) · blockdiag(Q_iᵀ)

and the middle factor is a small (Σr × Σr) core: its SVD W_L S W_Rᵀ gives U = Q W_L and V_iᵀ = W_Rᵀ[:, block i] Q_iᵀ,
so no out × n·in matrix is ever formed. The merged update is low-rank with rank ≤ Σ r_i. `Knots.reference`
is the obvious route (materialise every ΔW_i, SVD the out × n·in concatenation): the plain engine's merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeability.errors import MergeabilityError
from mergeability.merging.base import (
    check_params,
    check_positive,
    check_seed,
    check_updates,
    check_weights,
    compute_dtype,
    params_of,
    result,
)
from mergeability.merging.ties import Weighting, check_sparsify, disjoint_merge, sparsify
from mergeability.updates import Dense, LowRank, Update


def shared_basis(factors: list[LowRank], weights: list[float], rtol: float) -> tuple[Tensor, list[Tensor]]:
    """U (out × K) and the blocks R_i = Σ V_iᵀ (K × in) of [w_1 ΔW_1 | … | w_n ΔW_n]."""
    B_cat = torch.cat([(w * f.scale) * f.B for f, w in zip(factors, weights)], 1)
    Q, R = torch.linalg.qr(B_cat)
    qa = [f.qr_At for f in factors]  # A_iᵀ = Q_i P_i, cached on the factor
    blocks, start = [], 0
    for f, (_, P) in zip(factors, qa):
        blocks.append(R[:, start : start + f.rank] @ P.T)
        start += f.rank
    core = torch.cat(blocks, 1)
    WL, S, WRt = torch.linalg.svd(core, full_matrices=False)
    keep = max(1, int((S > rtol * S[0]).sum())) if S[0] > 0 else 1
    U = Q @ WL[:, :keep]
    Rs, start = [], 0
    for (Qi, P) in qa:
        r_i = P.shape[0]
        Rs.append((S[:keep, None] * WRt[:keep, start : start + r_i]) @ Qi.T)
        start += r_i
    return U, Rs


def dense_basis(factors: list[LowRank], weights: list[float], rtol: float) -> tuple[Tensor, list[Tensor]]:
    """What `shared_basis` computes, the obvious way: the SVD of the materialised [w_1 ΔW_1 | … | w_n ΔW_n]."""
    cat = torch.cat([w * f.delta() for f, w in zip(factors, weights)], 1)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    keep = max(1, int((S > rtol * S[0]).sum())) if S[0] > 0 else 1
    # The concatenation has rank ≤ Σ r_i; beyond that its singular values are rounding noise (~1e-6 σ_max in
    # float32, above rtol), and keeping them would dilute TIES's density over extra rows.
    keep = min(keep, sum(f.rank for f in factors))
    cols = factors[0].shape[1]
    return U[:, :keep], [S[:keep, None] * Vh[:keep, i * cols : (i + 1) * cols] for i in range(len(factors))]


@dataclass(frozen=True)
class Knots:
    """KnOTS over LoRA updates; the result stays low-rank (rank ≤ the sum of the input ranks)."""

    inner: Literal["ties", "mean"] = "ties"  # how the aligned blocks R_i are merged
    # TIES: fraction of each update's aligned entries kept. 1.0 (no trimming, as the official KnOTS configuration
    # for Llama LoRAs): on the 182-update Wikidata study, density 0.2 and 1.0 gave the same score distribution to
    # within 4 updates per bin and the same correlations (`experiment knots-settings`; README)
    density: float = 1.0
    # scaling of the merged update. 1.0, not the official 0.5: at 0.5 every update is halved where it does not
    # conflict, and 52 % of the study's updates scored 0 (30 % at 1.0), a floor that ties the ranks the claims use
    lam: float = 1.0
    per_module: bool = False  # TIES: trim per module instead of over the whole update
    dare: float | None = None  # DARE drop probability: replaces magnitude trimming when set
    seed: int = 0  # for DARE's random masks
    rtol: float = 1e-7  # drop singular directions below rtol · σ_max (numerically zero)
    # TIES inside: how weights enter the disjoint mean of the aligned blocks (see `ties.disjoint_merge`):
    # "agreeing" divides by the agreeing updates' weights (they cancel where blocks do not overlap), "all" by the
    # mean weight of every update (they do not). The mean inside is a weighted mean either way
    weighting: Weighting = "agreeing"

    name = "knots"

    def __post_init__(self) -> None:
        check_params(self)
        check_sparsify(self.density, self.dare)
        check_positive("lam", self.lam)
        check_seed(self.seed)
        if not 0.0 <= self.rtol < 1.0:
            raise MergeabilityError(f"rtol must be in [0, 1), got {self.rtol:g}")

    def merge(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        return self._merge(updates, self._check(updates, weights), shared_basis)

    def reference(self, updates: Sequence[Update], weights: Sequence[float] | None = None) -> Update:
        """The same merge by the obvious route (every ΔW_i materialised, SVD of the out × n·in concatenation):
        the plain engine's merge, for checking. The result is dense."""
        w = self._check(updates, weights)
        merged = self._merge(updates, w, dense_basis)
        return result({n: Dense(m.delta()) for n, m in merged.modules.items()}, updates, self.name,
                      params_of(self), w)

    def _check(self, updates: Sequence[Update], weights: Sequence[float] | None) -> list[float]:
        w = check_weights(weights, len(updates))
        check_updates(updates)
        for u in updates:
            if any(not isinstance(m, LowRank) for m in u.modules.values()):
                raise MergeabilityError("knots needs low-rank (LoRA) updates: merge dense updates with ties or mean")
        return w

    def _merge(self, updates: Sequence[Update], w: list[float], basis) -> Update:
        dtype = compute_dtype(updates)
        names = sorted({n for u in updates for n in u.modules})
        bases: dict[str, Tensor] = {}
        aligned: list[dict[str, Tensor]] = [{} for _ in updates]  # per update: module -> R_i
        for name in names:
            idx = [i for i, u in enumerate(updates) if name in u.modules]
            # The weights scale each update before the SVD, so trimming and sign election see them.
            fs = [updates[i].modules[name] for i in idx]
            fs = [f if f.dtype == dtype else f.to(dtype) for f in fs]  # keeps the cached QR when it can
            bases[name], Rs = basis(fs, [w[i] for i in idx], self.rtol)
            for i, R_i in zip(idx, Rs):
                aligned[i][name] = R_i
        if self.inner == "mean":
            total = sum(w)
            merged = {n: sum(blk[n] for blk in aligned if n in blk) / total for n in names}
        else:
            trimmed = sparsify(aligned, self.density, self.per_module, self.dare, self.seed)
            merged = disjoint_merge(trimmed, w, self.weighting)
        out = {n: LowRank(self.lam * merged[n], bases[n], 1.0) for n in names}
        return result(out, updates, self.name, params_of(self), w)
