"""Pool-relative interference features and rank truncation (issue #16), each against its dense twin: the obvious
float64 computation on materialised ΔW, written out here as literally as the definition reads."""

import numpy as np
import pytest
import torch

from mergeability import MergeabilityError
from mergeability import interference as itf
from mergeability.updates import Dense, LowRank, Update

TOL = 1e-10  # float64 throughout: fast and dense routes agree to rounding
# Two modules of different shapes. "wide" has more rows than the pool has columns (subspace_energy takes its
# column-Gram route there), "tall" fewer (the rest's out×out Gram, by eigh as r > out/8; `contour_pool` below takes
# the contour route); the Gram takes its factor route on "wide" and the dense one on "tall" (ranks up to 4 on 4×3:
# materialising ΔW is cheaper). Both Gram routes are checked on each module below.
SHAPES = {"m.wide": (12, 8), "m.tall": (4, 3)}
RANKS = [{"m.wide": 1, "m.tall": 2}, {"m.wide": 2, "m.tall": 3}, {"m.wide": 3, "m.tall": 1}, {"m.wide": 2, "m.tall": 4}]
SCALES = [0.5, 2.0, -1.5, 0.75]


def low_rank(out_f, in_f, r, scale, g, dtype=torch.float64):
    return LowRank(torch.randn(r, in_f, generator=g, dtype=dtype), torch.randn(out_f, r, generator=g, dtype=dtype),
                   scale)


def pool(seed=0, dense=False, dtype=torch.float64, deficient=False):
    """Four updates with mixed ranks and non-unit scales (one negative); with `dense`, update 2's "m.tall" is a
    Dense ΔW; with `deficient`, update 2's "m.wide" has factor rank 3 but rank 2 (a zero row of A)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (ranks, scale) in enumerate(zip(RANKS, SCALES)):
        mods = {n: low_rank(*SHAPES[n], ranks[n], scale, g, dtype) for n in SHAPES}
        if dense and i == 2:
            mods["m.tall"] = Dense(torch.randn(*SHAPES["m.tall"], generator=g, dtype=dtype))
        if deficient and i == 2:
            m = mods["m.wide"]
            mods["m.wide"] = LowRank(torch.cat([m.A[:-1], torch.zeros_like(m.A[-1:])]), m.B, m.scale)
        out.append(Update(mods, "tiny", {"id": i}))
    return out


def deltas(update):
    return {n: m.delta().double() for n, m in sorted(update.modules.items())}


def flat(update):
    return torch.cat([d.flatten() for d in deltas(update).values()])


def cos(a, b):
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else 0.0


# --------------------------------------------------------------------------------------------- dense twins


def ref_gram(us):
    return np.array([[(flat(a) @ flat(b)).item() for b in us] for a in us])


def ref_cos_rest(us):
    return np.array([cos(flat(u), sum(flat(v) for j, v in enumerate(us) if j != t)) for t, u in enumerate(us)])


def ref_pairwise(us):
    return np.array([np.mean([cos(flat(u), flat(v)) for j, v in enumerate(us) if j != t]) for t, u in enumerate(us)])


def ref_subspace_energy(us, k):
    """Top-k left singular vectors of the others' ΔW side by side, by a dense SVD of that concatenation; a
    direction whose σ² is below 1e-14 of the whole pool's energy in the module is null."""
    out = []
    for t, u in enumerate(us):
        num = den = 0.0
        for name, d in deltas(u).items():
            rest = torch.cat([deltas(v)[name] for j, v in enumerate(us) if j != t], dim=1)
            pool_energy = sum(deltas(v)[name].square().sum() for v in us)
            left, sv, _ = torch.linalg.svd(rest, full_matrices=False)
            top = left[:, :k][:, sv[:k] ** 2 > itf.NULL_ENERGY * pool_energy]
            num += (top.T @ d).square().sum().item()
            den += d.square().sum().item()
        out.append(num / den if den else 0.0)
    return np.array(out)


def ref_basis(d):
    left, sv, _ = torch.linalg.svd(d, full_matrices=False)
    return left[:, sv > itf.NULL_SV * sv[0]]


def ref_overlap(us):
    out = []
    for t, u in enumerate(us):
        ratios = []
        for j, v in enumerate(us):
            if j != t:
                qs = [(ref_basis(deltas(u)[n]), ref_basis(deltas(v)[n])) for n in deltas(u)]
                num = sum((a.T @ b).square().sum().item() for a, b in qs)
                ratios.append(num / sum(min(a.shape[1], b.shape[1]) for a, b in qs))
        out.append(np.mean(ratios))
    return np.array(out)


def ref_trimmed(update, density):
    """TIES's trim over all of an update's entries, the threshold by sorting (tests/reference.py's way)."""
    ds = deltas(update)
    mags = torch.sort(torch.cat([d.flatten() for d in ds.values()]).abs(), descending=True).values
    kth = mags[max(1, round(density * mags.numel())) - 1]
    return {n: torch.where(d.abs() >= kth, d, torch.zeros_like(d)) for n, d in ds.items()}


def ref_sign_conflict(us, density):
    """A plain count, entry by entry."""
    trimmed = [ref_trimmed(u, density) for u in us]
    rates = []
    for t in range(len(us)):
        kept = conflicts = 0
        for name, own in trimmed[t].items():
            for idx in np.ndindex(*own.shape):
                x = own[idx].item()
                if x == 0:
                    continue
                kept += 1
                rest = sum(trimmed[j][name][idx].item() for j in range(len(us)) if j != t)
                conflicts += rest != 0 and np.sign(rest) != np.sign(x)
        rates.append(conflicts / kept if kept else 0.0)
    return np.array(rates)


def ref_effective_rank(update):
    num = den = 0.0
    for d in deltas(update).values():
        sv = torch.linalg.svdvals(d)
        p = sv / sv.sum()
        p = p[p > 0]
        num += sv.square().sum().item() * np.exp(-(p * p.log()).sum().item())
        den += sv.square().sum().item()
    return num / den


def ref_truncated(d, rank):
    left, sv, vh = torch.linalg.svd(d, full_matrices=False)
    return left[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank], sv


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dense", [False, True])
def test_gram_matches_dense(dense):
    us = pool(dense=dense)
    np.testing.assert_allclose(itf.gram(us), ref_gram(us), rtol=TOL, atol=TOL)


def test_gram_routes_agree_on_every_module(monkeypatch):
    """Each module through both routes, whichever the cost rule picks; the dense one also one row at a time."""
    us = pool()
    picked = []
    monkeypatch.setattr(itf, "_factor_gram", lambda mods, f=itf._factor_gram: picked.append("factor") or f(mods))
    monkeypatch.setattr(itf, "_dense_gram", lambda mods, f=itf._dense_gram: picked.append("dense") or f(mods))
    itf.gram(us)
    assert picked == ["dense", "factor"]  # modules in name order: "m.tall", "m.wide"
    monkeypatch.undo()
    for name in SHAPES:
        mods = [u.modules[name] for u in us]
        ref = ref_gram([Update({name: m}) for m in mods])
        np.testing.assert_allclose(itf._factor_gram(mods), ref, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(itf._dense_gram(mods), ref, rtol=TOL, atol=TOL)
    monkeypatch.setattr(itf, "BLOCK_BYTES", 8)  # one row of every ΔW per block
    np.testing.assert_allclose(itf.gram(us), ref_gram(us), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dense", [False, True])
def test_cosines_match_dense(dense):
    us = pool(dense=dense)
    g = itf.gram(us)
    np.testing.assert_allclose(itf.cosine_with_rest(g), ref_cos_rest(us), atol=TOL)
    np.testing.assert_allclose(itf.mean_pairwise_cosine(g), ref_pairwise(us), atol=TOL)


def test_cosines_are_zero_not_nan_for_zero_updates():
    g = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # updates 1 and 2 are zero
    assert itf.cosine_with_rest(g).tolist() == [0.0, 0.0, 0.0]
    assert itf.mean_pairwise_cosine(g).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(MergeabilityError, match="square gram"):
        itf.cosine_with_rest(np.ones(3))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4, 100])
def test_subspace_energy_matches_svd_of_the_rest(dense, k):
    us = pool(dense=dense, deficient=dense)
    fast = itf.subspace_energy(us, k)
    np.testing.assert_allclose(fast, ref_subspace_energy(us, k), atol=1e-9)
    assert ((fast >= 0) & (fast <= 1)).all()


def test_subspace_energy_takes_both_routes():
    """"m.wide" (12 rows, 8 columns of X in all) goes by the column Gram, "m.tall" (4 rows) by the out×out one:
    each module alone must match the dense SVD too."""
    us = pool()
    for name in SHAPES:
        alone = [Update({name: u.modules[name]}) for u in us]
        np.testing.assert_allclose(itf.subspace_energy(alone, 2), ref_subspace_energy(alone, 2), atol=1e-9)
    cols = {n: sum(min(r[n], SHAPES[n][1]) for r in RANKS) for n in SHAPES}
    assert cols["m.wide"] <= SHAPES["m.wide"][0] and cols["m.tall"] > SHAPES["m.tall"][0]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("deficient", [False, True])
def test_subspace_overlap_matches_dense(dense, deficient):
    """A rank-deficient factor pair counts by its true rank: its null direction is not part of its basis."""
    us = pool(dense=dense, deficient=deficient)
    fast = itf.mean_subspace_overlap(us)
    np.testing.assert_allclose(fast, ref_overlap(us), atol=TOL)
    assert ((fast >= 0) & (fast <= 1)).all()


def test_subspace_overlap_by_rank_groups():
    """Fifteen updates in three rank groups on a 6-row module: the rank-2 and rank-3 groups have more columns than
    rows (their projector route), the rank-1 group fewer (the product route)."""
    us = contour_pool(out_f=6)
    np.testing.assert_allclose(itf.mean_subspace_overlap(us), ref_overlap(us), atol=TOL)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_sign_conflict_matches_a_count_loop(dense, density):
    us = pool(dense=dense)
    np.testing.assert_array_equal(itf.sign_conflict_rate(us, density), ref_sign_conflict(us, density))


def test_sign_conflict_counts_only_where_the_rest_keeps_something():
    """Two disjoint one-entry updates and a third that opposes the first: 1 of 1, 0 of 1 (nothing opposite kept
    beside it), 1 of 1."""
    def one(i, j, v):
        w = torch.zeros(2, 2, dtype=torch.float64)
        w[i, j] = v
        return Update({"m": Dense(w)})

    us = [one(0, 0, 1.0), one(1, 1, 2.0), one(0, 0, -3.0)]
    assert itf.sign_conflict_rate(us, density=0.25).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(MergeabilityError, match="density"):
        itf.sign_conflict_rate(us, density=0.0)


@pytest.mark.parametrize("dense", [False, True])
def test_effective_rank_matches_dense(dense):
    for u in pool(dense=dense):
        assert itf.effective_rank(u) == pytest.approx(ref_effective_rank(u), rel=TOL)
    eye = Update({"m": Dense(torch.eye(3, dtype=torch.float64))})
    assert itf.effective_rank(eye) == pytest.approx(3.0)  # equal singular values: all three count
    assert itf.effective_rank(Update({"m": Dense(torch.zeros(2, 2))})) == 0.0


@pytest.mark.parametrize("out_f, n_small", [(8, 2), (16, 8)])  # the rest's Gram by eigh; by the contour
def test_planted_structure(out_f, n_small, monkeypatch):
    """An update orthogonal to the rest (its rows disjoint from theirs) has subspace energy 0 and cosine 0, even
    for k beyond the rest's rank (the rest's null directions are not directions); a copy of a dominant update has
    energy ~1 with k its rank, and overlaps its original fully."""
    g = torch.Generator().manual_seed(3)
    half = out_f // 2

    def rows(m, first):  # keep only rows first..first+half of B
        b = torch.zeros_like(m.B)
        b[first:first + half] = m.B[first:first + half]
        return LowRank(m.A, b, m.scale)

    big = rows(low_rank(out_f, 6, 2, 10.0, g), 0)
    small = [rows(low_rank(out_f, 6, 2, 0.01, g), 0) for _ in range(n_small)]
    apart = rows(low_rank(out_f, 6, 2, 1.0, g), half)
    us = [Update({"m": m}) for m in [big, big, *small, apart]]
    calls = []
    monkeypatch.setattr(itf, "_energy_above", lambda *a, f=itf._energy_above: calls.append(1) or f(*a))
    energy = itf.subspace_energy(us, k=out_f)
    assert energy[-1] == pytest.approx(0.0, abs=1e-12)
    assert itf.cosine_with_rest(itf.gram(us))[-1] == pytest.approx(0.0, abs=1e-12)
    assert itf.subspace_energy(us, k=2)[1] > 0.999
    assert itf.mean_subspace_overlap(us[:2]).tolist() == pytest.approx([1.0, 1.0])
    assert bool(calls) == (out_f == 16)


def contour_pool(n=15, out_f=24, in_f=10, seed=5):
    """More columns than rows, and r ≤ out/8: subspace_energy takes the contour route for every update."""
    g = torch.Generator().manual_seed(seed)
    return [Update({"m": low_rank(out_f, in_f, 1 + i % 3, 0.5 + 0.3 * i, g)}) for i in range(n)]


@pytest.mark.parametrize("k", [1, 5, 12, 23, 24, 100])
def test_subspace_energy_contour_matches_svd_of_the_rest(k, monkeypatch):
    us = contour_pool()
    calls = []
    monkeypatch.setattr(itf, "_energy_above", lambda *a, f=itf._energy_above: calls.append(1) or f(*a))
    np.testing.assert_allclose(itf.subspace_energy(us, k), ref_subspace_energy(us, k), atol=1e-10)
    assert len(calls) == (len(us) if k < 24 else 0)  # k ≥ out: every direction, nothing to separate


def test_count_above_is_the_inertia_of_the_rest():
    """Sylvester's count of the eigenvalues of Λ − YYᵀ above θ against eigvalsh, at points all over the spectrum."""
    g = torch.Generator().manual_seed(1)
    lam = torch.sort(torch.rand(30, generator=g, dtype=torch.float64) * 5).values
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    mu = torch.linalg.eigvalsh(torch.diag(lam) - y @ y.T)
    for theta in torch.linspace(float(mu[0]) - 1, float(lam[-1]) + 1, 97).tolist() + [float(lam[7])]:
        assert itf._count_above(theta, lam, y) == int((mu > theta).sum())


def test_subspace_energy_tie_at_k_falls_back_to_eigh(monkeypatch):
    """Four rest directions of exactly equal energy and k = 2 inside them: no line separates the 2nd from the 3rd
    eigenvalue, so eigh decides; the target lies apart from that cluster, so its share is 0 however it splits."""
    out_f, in_f = 16, 6
    eye_out, eye_in = torch.eye(out_f, dtype=torch.float64), torch.eye(in_f, dtype=torch.float64)
    ties = [LowRank(eye_in[i:i + 1], eye_out[:, i:i + 1], 1.0) for i in range(4)]
    g = torch.Generator().manual_seed(0)
    others = []
    for _ in range(7):
        m = low_rank(out_f, in_f, 2, 0.01, g)
        others.append(LowRank(m.A, torch.cat([torch.zeros(8, 2, dtype=torch.float64), m.B[8:]]), m.scale))
    us = [Update({"m": m}) for m in [*ties, *others]]
    fell_back = []
    monkeypatch.setattr(itf, "_separate", lambda *a, f=itf._separate: fell_back.append(f(*a) is None) or f(*a))
    energy = itf.subspace_energy(us, 2)
    assert any(fell_back)
    np.testing.assert_allclose(energy[4:], 0.0, atol=1e-12)
    np.testing.assert_allclose(energy, ref_subspace_energy(us, 2), atol=1e-10)


def test_truncate_is_the_dense_truncated_svd():
    us = pool(dense=True)
    u = us[2]  # "m.wide" LowRank of rank 3, "m.tall" Dense 4×3
    out, energy = itf.truncate(u, 2)
    kept = total = 0.0
    for name, d in deltas(u).items():
        ref, sv = ref_truncated(d, 2)
        torch.testing.assert_close(out.modules[name].delta().double(), ref, rtol=TOL, atol=TOL)
        assert isinstance(out.modules[name], LowRank) and out.modules[name].rank == 2
        kept, total = kept + sv[:2].square().sum().item(), total + sv.square().sum().item()
    assert energy == pytest.approx(kept / total, rel=TOL) and energy < 1
    assert out.meta == {"id": 2, "truncated_rank": 2, "energy_kept": energy}
    assert u.meta == {"id": 2}  # the input is not touched


def test_truncate_keeps_dtype_and_low_rank_modules():
    u = pool(dtype=torch.float32)[3]  # ranks 2 ("m.wide") and 4 ("m.tall")
    out, energy = itf.truncate(u, 2)
    assert {m.dtype for m in out.modules.values()} == {torch.float32}
    assert out.modules["m.wide"] is u.modules["m.wide"]  # rank 2 already
    ref, _ = ref_truncated(u.modules["m.tall"].delta().double(), 2)
    torch.testing.assert_close(out.modules["m.tall"].delta().double(), ref, rtol=1e-5, atol=1e-5)
    assert out.modules["m.tall"].A.is_contiguous() and out.modules["m.tall"].B.is_contiguous()


def test_truncate_at_or_above_the_true_rank_changes_nothing():
    u = pool(dense=True)[2]
    same, energy = itf.truncate(u, 10)
    assert energy == 1.0 and all(same.modules[n] is u.modules[n] for n in u.modules)
    # factor rank 3, true rank 2 (A's last row is zero): truncating to 2 keeps ΔW and all of its energy
    m = u.modules["m.wide"]
    deficient = Update({"m": LowRank(torch.cat([m.A[:2], torch.zeros_like(m.A[:1])]), m.B, m.scale)})
    out, energy = itf.truncate(deficient, 2)
    torch.testing.assert_close(out.modules["m"].delta(), deficient.modules["m"].delta(), rtol=TOL, atol=TOL)
    assert energy == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("rank", [0, -3, 1.5, True])
def test_truncate_rank_must_be_positive(rank):
    with pytest.raises(MergeabilityError) as e:
        itf.truncate(pool()[0], rank)
    assert str(e.value) == f"--max-rank must be a positive integer, got {rank!r}"


def test_pool_features_is_every_function_in_float64():
    us32 = pool(dense=True, dtype=torch.float32)
    us = [u.to(torch.float64) for u in us32]
    feats = itf.pool_features({f"u{i}": u for i, u in enumerate(us32)}, k=3, density=0.5)
    assert list(feats) == ["u0", "u1", "u2", "u3"] and all(list(f) == list(itf.FEATURES) for f in feats.values())
    g = itf.gram(us)
    expect = {"cos_rest": itf.cosine_with_rest(g), "pairwise_cos": itf.mean_pairwise_cosine(g),
              "subspace_energy": itf.subspace_energy(us, 3), "subspace_overlap": itf.mean_subspace_overlap(us),
              "sign_conflict": itf.sign_conflict_rate(us, 0.5),
              "effective_rank": [itf.effective_rank(u) for u in us]}
    for name, values in expect.items():
        assert [feats[f"u{i}"][name] for i in range(4)] == pytest.approx(list(values), abs=1e-12), name


def test_bad_pools_are_one_line_errors():
    us = pool()
    with pytest.raises(MergeabilityError, match=r"^pool features need at least 2 updates, got 1: "):
        itf.pool_features({"a": us[0]}, k=2)
    with pytest.raises(MergeabilityError, match="adapt different modules"):
        itf.gram([us[0], Update({"m.wide": us[1].modules["m.wide"]}, "tiny")])
    with pytest.raises(MergeabilityError, match="k must be a positive integer"):
        itf.subspace_energy(us, 0)
    with pytest.raises(MergeabilityError, match="no updates"):
        itf.mean_subspace_overlap([])


def test_zero_and_rank_zero_updates_give_zeros_not_nans():
    """A PEFT-initialised update (B = 0), a rank-0 one, a zero Dense one and a zero scale beside one real update:
    nothing to interfere with, so every pool feature is 0 (the real update keeps its own effective rank)."""
    g = torch.Generator().manual_seed(0)
    real = LowRank(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 1.0)
    zeros = [LowRank(real.A, torch.zeros(6, 2), 1.0), LowRank(torch.zeros(0, 5), torch.zeros(6, 0), 1.0),
             Dense(torch.zeros(6, 5)), LowRank(real.A, real.B, 0.0)]
    feats = itf.pool_features({str(i): Update({"m": m}) for i, m in enumerate([real, *zeros])}, k=3)
    for i, f in feats.items():
        assert all(np.isfinite(v) for v in f.values())
        assert {n: v for n, v in f.items() if n != "effective_rank"} == dict.fromkeys(itf.FEATURES[:-1], 0.0)
        assert (f["effective_rank"] > 1) == (i == "0")
