"""Pool-relative interference: how much one update is in the way of the others it will be merged with, and they
in its way, measured before any merge is tried (issue #16). Each feature looks at update t against the REST of
its pool: `cosine_with_rest` (is ΔW_t aligned with the sum of the others, as a mean merge sees it),
`mean_pairwise_cosine` (the ModelKinship-style pairwise baseline), `subspace_energy` (the share of ‖ΔW_t‖² lying
in the rest's top-k left singular directions: what a low-rank merge such as KnOTS keeps of t is what the shared
subspace leaves room for), `mean_subspace_overlap` (the Mergeability-Bench-style overlap of column spaces),
`sign_conflict_rate` (how many of t's TIES-trimmed entries the rest outvotes in sign), and `effective_rank`
(Roy & Vetterli: how spread t's own spectrum is). `truncate` is the Eckart–Young truncation behind `--max-rank`.
Everything is computed in float64 from the factors (r×r and out×out products; an out×in ΔW is materialised only
update by update, never per pair, and only where that is the cheaper route), and every function has a dense twin
in tests/test_interference.py, the obvious computation on materialised ΔW, which it matches to a stated
tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral

import numpy as np
import torch
from torch import Tensor

from mergeability.errors import MergeabilityError
from mergeability.merging.base import check_updates
from mergeability.merging.ties import check_sparsify, magnitude_threshold
from mergeability.updates import Dense, LowRank, ModuleDelta, Update

F64 = torch.float64
NULL_SV = 1e-7  # a singular value below this fraction of its module's largest is numerically zero
# A direction of the rest whose squared singular value is below this fraction of the module's pool energy is
# numerically null: removing t's own term from the pool's Gram leaves rounding of about 1e-16 of that energy,
# and a "top-k" direction of the rest made of rounding would lie in t's own column space.
NULL_ENERGY = 1e-14
BLOCK_BYTES = 256 << 20  # dense Gram route: how many bytes of materialised ΔW rows it holds at once
FEATURES = ("cos_rest", "pairwise_cos", "subspace_energy", "subspace_overlap", "sign_conflict", "effective_rank")


# ------------------------------------------------------------------------------------------------- the pool


def _f64(m: ModuleDelta) -> ModuleDelta:
    if isinstance(m, LowRank):
        return LowRank(m.A.to("cpu", F64), m.B.to("cpu", F64), float(m.scale))
    return Dense(m.weight.to("cpu", F64))


def _pool(updates: Sequence[Update]) -> list[list[ModuleDelta]]:
    """Per module (sorted by name), every update's delta in float64 on the CPU, after checking that the updates
    adapt the same modules with the same shapes."""
    if len(updates) == 0:
        raise MergeabilityError("no updates given: pool features need the updates of a pool")
    check_updates(updates)
    names = sorted(updates[0].modules)
    for i, u in enumerate(updates):
        if sorted(u.modules) != names:
            odd = sorted(set(u.modules) ^ set(names))
            raise MergeabilityError(f"update {i} and update 0 adapt different modules ({', '.join(odd[:3])}): "
                                    "pool features compare updates of the same modules")
    return [[_f64(u.modules[n]) for u in updates] for n in names]


def _is_count(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _symmetric(upper: Tensor) -> np.ndarray:
    u = torch.triu(upper)
    return (u + u.T - torch.diag(u.diagonal())).numpy()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den clipped to [0, 1], 0 where den is 0."""
    return np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 0), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------- the gram


def gram(updates: Sequence[Update]) -> np.ndarray:
    """n×n float64 Frobenius inner products <ΔW_i, ΔW_j>, summed over the modules (every update must adapt the
    same modules with the same shapes)."""
    g = np.zeros((len(updates), len(updates)))
    for mods in _pool(updates):
        out_f, in_f = mods[0].shape
        cols = sum(m.rank for m in mods if isinstance(m, LowRank))
        # The factor route costs (Σr)²·(out+in) flops, the dense one n²·out·in: at r = 64 on a 1536×576 module
        # materialising each ΔW once is ~10× cheaper than the r×r products of every pair.
        if all(isinstance(m, LowRank) for m in mods) and cols**2 * (out_f + in_f) <= len(mods) ** 2 * out_f * in_f:
            g += _factor_gram(mods)
        else:
            g += _dense_gram(mods)
    return g


def _pairwise(sizes: Sequence[int], block: Callable[[int, int], Tensor]) -> np.ndarray:
    """A symmetric n×n matrix built from column blocks: for update i, owning columns s:e of a concatenation,
    `block(s, e)` has one column per concatenated column from s on; entry (i, j), j ≥ i, sums those of j."""
    n = len(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    owner = torch.repeat_interleave(torch.arange(n), torch.as_tensor(list(sizes), dtype=torch.long))
    upper = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        s, e = bounds[i], bounds[i + 1]
        if e > s:
            upper[i].index_add_(0, owner[s:], block(s, e).sum(0))
    return _symmetric(upper)


def _factor_gram(mods: Sequence[LowRank]) -> np.ndarray:
    """<s_i B_i A_i, s_j B_j A_j> = s_i s_j · Σ (B_iᵀB_j) ∘ (A_i A_jᵀ): r_i×r_j products, no out×in matrix."""
    left = torch.cat([m.scale * m.B for m in mods], 1)
    right = torch.cat([m.A for m in mods], 0)
    return _pairwise([m.rank for m in mods], lambda s, e: (left[:, s:e].T @ left[:, s:]) * (right[s:e] @ right[s:].T))


def _dense_gram(mods: Sequence[ModuleDelta]) -> np.ndarray:
    """Flattened ΔW against flattened ΔW, streamed over blocks of rows: every entry of every ΔW is formed once,
    and one block of rows of all n updates (at most BLOCK_BYTES) is held at a time."""
    n, (out_f, in_f) = len(mods), mods[0].shape
    per = max(1, BLOCK_BYTES // (8 * n * in_f))
    upper = torch.zeros(n, n, dtype=F64)
    for a in range(0, out_f, per):
        rows = torch.stack([_rows(m, a, a + per).flatten() for m in mods])
        upper += rows @ rows.T
    return _symmetric(upper)


def _rows(m: ModuleDelta, a: int, b: int) -> Tensor:
    return m.scale * (m.B[a:b] @ m.A) if isinstance(m, LowRank) else m.weight[a:b]


def cosine_with_rest(g: np.ndarray) -> np.ndarray:
    """Per t: cos(ΔW_t, mean_{j≠t} ΔW_j) from the gram alone; 0 where either norm is 0."""
    g = _square(g)
    own, row = np.diag(g), g.sum(1)
    rest = g.sum() - 2 * row + own  # ‖Σ_{j≠t} ΔW_j‖², expanded
    noise = 8 * np.finfo(float).eps * np.abs(g).sum()  # the expansion's rounding: below it the rest is zero
    return _cos(row - own, own, np.where(rest > noise, rest, 0.0))


def mean_pairwise_cosine(g: np.ndarray) -> np.ndarray:
    """Per t: the mean over j≠t of cos(ΔW_t, ΔW_j); 0 for a pair where either norm is 0."""
    g = _square(g)
    n = len(g)
    d = np.diag(g)
    cos = _cos(g, d[:, None], d[None, :])
    np.fill_diagonal(cos, 0.0)
    return cos.sum(1) / (n - 1) if n > 1 else np.zeros(n)


def _square(g) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise MergeabilityError(f"expected a square gram matrix (n×n), got shape {g.shape}")
    return g


def _cos(dot: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    den = np.sqrt(np.clip(a2, 0.0, None) * np.clip(b2, 0.0, None))
    dot = np.broadcast_to(dot, np.broadcast_shapes(dot.shape, den.shape)).astype(np.float64)
    return np.clip(np.divide(dot, den, out=np.zeros_like(dot), where=den > 0), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------ subspaces


def _svd_factors(m: ModuleDelta) -> tuple[Tensor, Tensor, Tensor]:
    """ΔW = U diag(σ) Vᵀ (thin, σ descending); for LowRank from two thin QRs and the SVD of the small core."""
    if isinstance(m, Dense):
        u, s, vh = torch.linalg.svd(m.weight, full_matrices=False)
        return u, s, vh.T
    qb, rb = torch.linalg.qr(m.B)
    qa, ra = torch.linalg.qr(m.A.T)
    u, s, vh = torch.linalg.svd(m.scale * rb @ ra.T, full_matrices=False)
    return qb @ u, s, qa @ vh.T


def _column_basis(m: ModuleDelta) -> Tensor:
    """Orthonormal basis of ΔW's column space: its left singular vectors with σ > NULL_SV·σ_max (for LowRank
    this is the QR basis of B, rotated, whenever B and A have full rank)."""
    u, s, _ = _svd_factors(m)
    return u[:, s > NULL_SV * s[0]] if s.numel() and s[0] > 0 else u[:, :0]


def _left_factor(m: ModuleDelta) -> Tensor:
    """X with X Xᵀ = ΔW ΔWᵀ and min(rank, in) columns: ΔW = s·B·R_Aᵀ·Q_Aᵀ (thin QR Aᵀ = Q_A R_A) and Q_A has
    orthonormal columns, so it drops out of ΔW ΔWᵀ."""
    if isinstance(m, LowRank):
        return m.scale * m.B @ torch.linalg.qr(m.A.T).R.T
    return torch.linalg.qr(m.weight.T).R.T


def subspace_energy(updates: Sequence[Update], k: int) -> np.ndarray:
    """Per t: Σ_modules ‖U_kᵀ ΔW_t‖² / Σ_modules ‖ΔW_t‖², U_k the top-k left singular vectors of the rest of the
    pool ([ΔW_j]_{j≠t} side by side), k = min(k, out), leaving out numerically null directions (NULL_ENERGY).
    In [0, 1]. One out×out eigh per module, then per update r×r work (`_energy_above`); where the pool's total
    rank is below out, one eigh of the rest's column Gram per update instead."""
    _check_k(k)
    num, den = np.zeros(len(updates)), np.zeros(len(updates))
    for mods in _pool(updates):
        xs = [_left_factor(m) for m in mods]
        num += _module_energy(xs, int(k))
        den += [x.square().sum().item() for x in xs]
    return _ratio(num, den)


def _check_k(k) -> None:
    if not _is_count(k) or k < 1:
        raise MergeabilityError(f"k must be a positive integer (directions of the rest's subspace), got {k!r}")


def _module_energy(xs: Sequence[Tensor], k: int) -> np.ndarray:
    """Per t: ‖U_kᵀ X_t‖² for one module, where ΔW_t ΔW_tᵀ = X_t X_tᵀ and U_k spans the rest's top k."""
    full = torch.cat(xs, 1)
    out_f, cols = full.shape
    floor = NULL_ENERGY * full.square().sum().item()
    energy = np.zeros(len(xs))
    if cols > out_f:  # the rest's Gram S − X_t X_tᵀ, in the eigenbasis of the pool's S (one eigh per module)
        lam, vecs = torch.linalg.eigh(full @ full.T)
        for t, x in enumerate(xs):
            energy[t] = _energy_in_top(lam, vecs.T @ x, k, floor)
        return energy
    # Fewer columns than rows: the rest's left singular vectors are X_rest W Λ^-½ from the eigenpairs (Λ, W) of
    # its column Gram, a submatrix of the pool's.
    pool = full.T @ full
    bounds = np.concatenate([[0], np.cumsum([x.shape[1] for x in xs])]).astype(int)
    for t in range(len(xs)):
        s, e = bounds[t], bounds[t + 1]
        rest = torch.cat([torch.arange(0, s), torch.arange(e, cols)])
        if rest.numel():
            lam, w = torch.linalg.eigh(pool[rest][:, rest])
            lam, w = lam[-k:], w[:, -k:]
            keep = lam > floor
            energy[t] = ((w[:, keep].T @ pool[rest, s:e]) / lam[keep].sqrt()[:, None]).square().sum().item()
    return energy


# The rest's Gram in the pool's eigenbasis is D = Λ − YYᵀ (Y = VᵀX_t, r columns), and the share of X_t in its top
# eigenvectors needs no eigh of D: F(z) = Yᵀ(z − D)⁻¹Y = G(I + G)⁻¹ with G(z) = Yᵀ(z − Λ)⁻¹Y (Woodbury), r×r,
# has a pole at each eigenvalue μ of D with residue ‖Yᵀw_μ‖², so integrating it along a line between the k-th
# and the (k+1)-th eigenvalue gives what lies above; Sylvester's inertia of I + G(θ) says where that line is.
# ~100 r×r evaluations instead of an out×out eigh: ~10× faster at out = 1536, r = 64, and as exact (1e-13).
QUAD_STEP = 0.35  # trapezoid step in log y: its error is ~exp(-π²/step) ≈ 6e-13 of ‖X_t‖²
QUAD_TAIL = 10.0  # the grid runs e^10 past the nearest and the farthest eigenvalue; beyond, a geometric tail
QUAD_MAX_RANK = 128  # r above this (or above out/8) is cheaper by eigh: the r×r evaluations cost ~100·out·r²


def _energy_in_top(lam: Tensor, y: Tensor, k: int, floor: float) -> float:
    """Σ ‖Yᵀw‖² over the top k eigenvectors w of D = diag(lam) − YYᵀ whose eigenvalues exceed `floor`."""
    n, r = y.shape
    if r <= QUAD_MAX_RANK and 8 * r <= n:
        top = min(k, _count_above(floor, lam, y))
        if top in (0, n):
            return y.square().sum().item() if top else 0.0
        line = _separate(lam, y, top)
        if line is not None:
            return _energy_above(*line, lam, y)
    mu, w = torch.linalg.eigh(torch.diag(lam) - y @ y.T)  # many columns, or a tie at the k-th eigenvalue
    return (w[:, -k:][:, mu[-k:] > floor].T @ y).square().sum().item()


def _count_above(theta: float, lam: Tensor, y: Tensor) -> int:
    """How many eigenvalues of diag(lam) − YYᵀ exceed θ: the inertia of [[Λ − θ, Y], [Yᵀ, I]] by its two Schur
    complements gives #(D − θ > 0) = #(λ > θ) + #(eig(I + Yᵀ(θ − Λ)⁻¹Y) > 0) − r."""
    gap = theta - lam
    # θ exactly on an eigenvalue of Λ: count just beside it (the same count, unless an eigenvalue of D lies there)
    gap[gap == 0] = torch.finfo(F64).eps * max(abs(theta), torch.finfo(F64).tiny)
    g = y.T @ (y / gap[:, None])
    ev = torch.linalg.eigvalsh(torch.eye(y.shape[1], dtype=F64) + g)
    return int((lam > theta).sum()) + int((ev > 0).sum()) - y.shape[1]


def _separate(lam: Tensor, y: Tensor, k: int) -> tuple[float, float] | None:
    """(θ, δ): exactly k eigenvalues of D lie above θ and none within δ of it; None for a tie (no gap above
    1e-13 of the spectrum's width). Bisects brackets (a1, b1] ∋ μ_{k+1} and (a2, b2] ∋ μ_k until they are apart
    by more than their widths; every count narrows both."""
    lo = float(lam[0]) - y.square().sum().item() * (1 + 1e-9) - 1e-300  # D ≥ Λ − ‖Y‖² and D ≤ Λ
    hi = float(lam[-1]) * (1 + 1e-12) + 1e-300
    a1 = a2 = lo
    b1 = b2 = hi
    for _ in range(200):  # each bracket reaches 1e-13 of the width in ~45 halvings
        if b1 < a2 and max(b1 - a1, b2 - a2) <= a2 - b1:
            return (b1 + a2) / 2, (a2 - b1) / 2
        if max(b1 - a1, b2 - a2) <= 1e-13 * (hi - lo):
            break
        mid = (a1 + b1) / 2 if b1 - a1 >= b2 - a2 else (a2 + b2) / 2
        count = _count_above(mid, lam, y)
        if count > k:
            a1, a2 = max(a1, mid), max(a2, mid)
        elif count == k:
            b1, a2 = min(b1, mid), max(a2, mid)
        else:
            b1, b2 = min(b1, mid), min(b2, mid)
    return None


def _energy_above(theta: float, delta: float, lam: Tensor, y: Tensor) -> float:
    """Σ ‖Yᵀw‖² over the eigenpairs (μ, w) of D with μ > θ, no μ within δ of θ. Along z = θ + iy,
    (1/π)∫_0^∞ Re tr F dy = (Σ_{μ<θ} − Σ_{μ>θ}) ‖Yᵀw‖² / 2; in u = log y each μ adds a sech bump centred at
    log|θ − μ|, which the trapezoid rule integrates to ~exp(-π²/step), and beyond the grid φ ∝ e^{∓u}."""
    r = y.shape[1]
    span = max(theta - float(lam[0]) + y.square().sum().item(), float(lam[-1]) - theta, delta)
    ys = torch.arange(math.log(delta) - QUAD_TAIL, math.log(span) + QUAD_TAIL + QUAD_STEP, QUAD_STEP,
                      dtype=F64).exp()[:, None]
    a = theta - lam[None, :]
    den = a.square() + ys.square()  # 1/(θ + iy − λ) = (a − iy)/(a² + y²), a = θ − λ
    upper = torch.triu_indices(r, r)
    pairs = y[:, upper[0]] * y[:, upper[1]]  # G's upper triangle for every node in two real products
    g = torch.zeros(len(ys), r, r, dtype=torch.complex128)
    g[:, upper[0], upper[1]] = g[:, upper[1], upper[0]] = torch.complex((a / den) @ pairs, -(ys / den) @ pairs)
    eye = torch.eye(r, dtype=g.dtype)
    # tr G(I + G)⁻¹ by a solve, not r − tr (I + G)⁻¹: far out G is tiny and the difference would be rounding
    phi = torch.linalg.solve(eye + g, g).diagonal(dim1=-2, dim2=-1).sum(-1).real * ys[:, 0]
    tail = math.exp(-QUAD_STEP) / (1 - math.exp(-QUAD_STEP))
    integral = QUAD_STEP * (phi.sum() + (phi[0] + phi[-1]) * tail).item()
    return y.square().sum().item() / 2 - integral / math.pi


def mean_subspace_overlap(updates: Sequence[Update]) -> np.ndarray:
    """Per t: the mean over j≠t of Σ_modules ‖Q_tᵀ Q_j‖²_F / Σ_modules min(r_t, r_j), Q an orthonormal basis of
    the module's column space and r its dimension (`_column_basis`). In [0, 1].

    The partners j are taken a group at a time, those with the same ranks in every module (usually all of them):
    the pair's denominator is then the group's, and Σ_{j∈G} ‖Q_tᵀ Q_j‖² = tr(Q_tᵀ P_G Q_t) with P_G = Σ_{j∈G} Q_j Q_jᵀ,
    one out×out matrix per module and group instead of a product per pair."""
    n = len(updates)
    bases = [[_column_basis(m) for m in mods] for mods in _pool(updates)]  # module -> update -> Q
    ranks = np.array([[q.shape[1] for q in qs] for qs in bases]).reshape(len(bases), n)
    groups: dict[tuple, list[int]] = {}
    for j in range(n):
        groups.setdefault(tuple(ranks[:, j]), []).append(j)
    total = np.zeros(n)
    for key, members in groups.items():
        inner = sum(_overlap_with(qs, [qs[j] for j in members]) for qs in bases)
        inner[members] -= ranks[:, members].sum(0)  # a pair with itself: ‖Q_tᵀ Q_t‖² = r_t
        dims = np.minimum(ranks, np.array(key)[:, None]).sum(0).astype(float)  # the same for every j in the group
        total += np.divide(inner, dims, out=np.zeros(n), where=dims > 0)
    return np.clip(total / (n - 1), 0.0, 1.0) if n > 1 else np.zeros(n)


def _overlap_with(qs: Sequence[Tensor], group: Sequence[Tensor]) -> np.ndarray:
    """Per t: Σ_{j∈group} ‖Q_tᵀ Q_j‖²_F for one module: through P = Σ_j Q_j Q_jᵀ where the group's columns
    outnumber the rows, else through Q_tᵀ [Q_j]."""
    z = torch.cat(group, 1)
    if z.shape[1] > z.shape[0]:
        proj = z @ z.T
        return np.array([((proj @ q) * q).sum().item() for q in qs])
    return np.array([(z.T @ q).square().sum().item() for q in qs])


# ------------------------------------------------------------------------------------------------ signs, rank


def _trim(delta: Tensor, threshold: Tensor) -> Tensor:
    return delta * (delta.abs() >= threshold)  # as merging.ties.sparsify does


def sign_conflict_rate(updates: Sequence[Update], density: float = 0.2) -> np.ndarray:
    """Per t: TIES's trim (the top `density` of each update's entries by magnitude, one threshold over all its
    modules, as `Ties(per_module=False)`), then the fraction of t's kept (non-zero) entries whose sign differs
    from that of Σ_{j≠t} trimmed ΔW_j, counting only entries where that sum is non-zero (where the rest keeps
    nothing there is no sign to conflict with). 0 for an update with no kept entry.

    Two passes, one update's dense ΔW at a time: the trimmed sum over the pool, then each t against it less t."""
    check_sparsify(density, None)
    per_module = _pool(updates)
    by_update = [[mods[t] for mods in per_module] for t in range(len(updates))]
    totals = [torch.zeros(mods[0].shape, dtype=F64) for mods in per_module]
    thresholds = []
    for mods in by_update:
        deltas = [m.delta() for m in mods]
        thresholds.append(magnitude_threshold(torch.cat([d.flatten() for d in deltas]), density))
        for total, d in zip(totals, deltas):
            total += _trim(d, thresholds[-1])
    rate = np.zeros(len(updates))
    for t, mods in enumerate(by_update):
        kept = conflicts = 0
        for total, m in zip(totals, mods):
            own = _trim(m.delta(), thresholds[t])
            kept += int(torch.count_nonzero(own))
            # total − own is exactly 0 where no other update keeps the entry (t's own value added, then taken
            # out); the product is negative just where both are non-zero with opposite signs
            conflicts += int(torch.count_nonzero(own * (total - own) < 0))
        rate[t] = conflicts / kept if kept else 0.0
    return rate


def effective_rank(update: Update) -> float:
    """Energy-weighted mean over modules of exp(H(p)), p = σ/Σσ (Roy & Vetterli 2007); 0 for a zero update."""
    num = den = 0.0
    for m in update.modules.values():
        sv = _f64(m).singular_values()
        energy = sv.square().sum().item()
        if energy > 0:
            p = sv[sv > 0] / sv.sum()
            num += energy * math.exp(-(p * p.log()).sum().item())
            den += energy
    return num / den if den > 0 else 0.0


def truncate(update: Update, rank: int) -> tuple[Update, float]:
    """The best rank-`rank` approximation of every module (Eckart–Young), from the factors, as LowRank modules
    (B = U√σ, A = √σVᵀ, scale 1) in the input's dtype; a module whose factor rank (a Dense one's min(out, in))
    is ≤ `rank` is kept as it is. Returns it with the energy kept, Σσ_kept² / Σσ² over all modules (1.0 for a
    zero update), which is also noted in its meta with the rank."""
    if not _is_count(rank) or rank <= 0:
        raise MergeabilityError(f"--max-rank must be a positive integer, got {rank!r}")
    modules, kept, total = {}, 0.0, 0.0
    for name, m in update.modules.items():
        modules[name], k_energy, t_energy = _truncate_module(m, int(rank))
        kept, total = kept + k_energy, total + t_energy
    energy = kept / total if total > 0 else 1.0
    meta = {**update.meta, "truncated_rank": int(rank), "energy_kept": energy}
    return Update(modules, update.base_model, meta), energy


def _truncate_module(m: ModuleDelta, rank: int) -> tuple[ModuleDelta, float, float]:
    """(the truncated module, its energy kept, its energy)."""
    wide = m.to(F64)  # on the module's own device
    if (m.rank if isinstance(m, LowRank) else min(m.shape)) <= rank:
        energy = wide.fro_norm() ** 2
        return m, energy, energy
    u, s, v = _svd_factors(wide)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, (v[:, :rank] * root).T
    # contiguous: safetensors (save_update) refuses a transposed view
    low = LowRank(a.to(m.dtype).contiguous(), b.to(m.dtype).contiguous(), 1.0)
    return low, s[:rank].square().sum().item(), s.square().sum().item()


# ------------------------------------------------------------------------------------------------ all at once


def pool_features(updates: Mapping[str, Update], *, k: int, density: float = 0.2) -> dict[str, dict[str, float]]:
    """id -> {feature: value} (the names in FEATURES) for every update of the pool, in float64 on the CPU."""
    if len(updates) < 2:
        raise MergeabilityError(f"pool features need at least 2 updates, got {len(updates)}: "
                                "pass every update of the pool they will be merged in")
    _check_k(k)
    check_sparsify(density, None)
    ids = list(updates)
    pool = [Update({n: _f64(m) for n, m in u.modules.items()}, u.base_model, u.meta) for u in updates.values()]
    g = gram(pool)
    columns = (cosine_with_rest(g), mean_pairwise_cosine(g), subspace_energy(pool, k), mean_subspace_overlap(pool),
               sign_conflict_rate(pool, density), np.array([effective_rank(u) for u in pool]))
    return {i: {name: float(col[t]) for name, col in zip(FEATURES, columns)} for t, i in enumerate(ids)}
