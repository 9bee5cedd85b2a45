import dataclasses

import pytest
import torch

from conftest import random_update
from mergeability import MergeabilityError, merge
from mergeability.merging import METHODS, Knots, base_accuracy_weights, get_method
from mergeability.updates import Dense, LowRank, Update
from reference import ref_knots, ref_mean, ref_ties

TOL = 1e-9  # float64 inputs: fast and reference paths agree to rounding
SHAPES = {"layers.0.mlp.up_proj": (24, 16), "layers.1.self_attn.q_proj": (16, 16), "layers.1.mlp.up_proj": (24, 16)}


def pool(n=4, seed=0):
    """Updates with different ranks, alphas and module sets."""
    out = []
    for i in range(n):
        names = list(SHAPES) if i % 2 == 0 else list(SHAPES)[:2]
        ranks = {nm: 2 + (i + j) % 4 for j, nm in enumerate(names)}
        out.append(random_update({nm: SHAPES[nm] for nm in names}, ranks, scale=0.5 + i, seed=seed + i))
    return out


def assert_close(merged: Update, ref: dict, tol=TOL):
    assert set(merged.modules) == set(ref)
    for n, r in ref.items():
        d = merged.delta(n).double()
        err = (d - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err < tol, f"{n}: relative error {err:.2e}"


WEIGHTS = [None, [1.0, 2.0, 0.5, 1.5]]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_mean_matches_dense_reference(weights):
    us = pool()
    w = weights or [1.0] * len(us)
    m = merge(us, "mean", weights)
    assert all(isinstance(x, LowRank) for x in m.modules.values())
    assert_close(m, ref_mean(us, w))


def test_task_arithmetic_is_lambda_times_sum():
    us = pool()
    w = [1.0, -0.5, 2.0, 1.0]
    m = merge(us, "task_arithmetic", w, lam=0.7)
    ref = {n: 0.7 * sum(w) * r for n, r in ref_mean(us, w).items()}
    assert_close(m, ref)


@pytest.mark.parametrize("per_module", [False, True])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_dense_reference(per_module, weights, density):
    us = pool()
    w = weights or [1.0] * len(us)
    m = merge(us, "ties", weights, density=density, per_module=per_module, lam=1.3)
    assert_close(m, ref_ties(us, w, density, per_module, lam=1.3))


@pytest.mark.parametrize("per_module", [False, True])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("inner", ["ties", "mean"])
def test_knots_matches_dense_svd_reference(per_module, weights, inner):
    us = pool()
    w = weights or [1.0] * len(us)
    m = merge(us, "knots", weights, inner=inner, per_module=per_module, lam=0.9)
    assert all(isinstance(x, LowRank) for x in m.modules.values())
    # rank of the merged module never exceeds the summed input ranks
    for n, x in m.modules.items():
        assert x.rank <= sum(u.modules[n].rank for u in us if n in u.modules)
    assert_close(m, ref_knots(us, w, inner=inner, per_module=per_module, lam=0.9), tol=1e-7)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_knots_with_mean_inside_equals_mean(weights):
    us = pool()
    a, b = merge(us, "knots", weights, inner="mean"), merge(us, "mean", weights)
    assert_close(a, {n: b.delta(n).double() for n in b.modules})


def test_knots_dense_route_drops_float32_rounding_directions():
    # [ΔW_1 | … ] has rank ≤ Σ r_i, but its float32 SVD returns min(out, n·in) values, the rest rounding noise
    # around 1e-6 σ_max (above rtol). Kept, they would dilute TIES's density and change the merge.
    from mergeability.merging.knots import dense_basis, shared_basis

    us = [random_update({"m": (96, 64)}, 4, seed=i, dtype=torch.float32) for i in range(8)]
    fs = [u.modules["m"] for u in us]
    U, Rs = dense_basis(fs, [1.0] * 8, Knots().rtol)
    assert U.shape[1] == 32 == shared_basis(fs, [1.0] * 8, Knots().rtol)[0].shape[1]
    a, b = Knots().merge(us).delta("m"), Knots().reference(us).delta("m")
    assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_knots_rank_deficient_inputs():
    # the same update twice: the concatenation has half the rank; zero directions must be dropped cleanly
    u = random_update({"m": (20, 12)}, 3, seed=1)
    m = merge([u, u], "knots", inner="mean")
    assert m.modules["m"].rank == 3
    assert_close(m, {"m": u.delta("m").double()})


def test_mean_matches_peft_cat_combination(tiny_model):
    from peft import LoraConfig, get_peft_model

    cfgs = [LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "q_proj"]),
            LoraConfig(r=6, lora_alpha=3, target_modules=["up_proj", "q_proj"])]
    model = get_peft_model(tiny_model, cfgs[0], adapter_name="first")
    model.add_adapter("second", cfgs[1])
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_()
    w = [0.3, 0.7]
    model.add_weighted_adapter(["first", "second"], [x / sum(w) for x in w], "cat_ab", combination_type="cat")
    ups = []
    for name in ["first", "second"]:
        mods = {}
        for mod_name, mod in model.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                mods[mod_name] = LowRank(mod.lora_A[name].weight.detach().double(),
                                         mod.lora_B[name].weight.detach().double(), mod.scaling[name])
        ups.append(Update(mods))
    merged = merge(ups, "mean", w)
    for mod_name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "cat_ab" in mod.lora_A:
            a, b = mod.lora_A["cat_ab"].weight.double(), mod.lora_B["cat_ab"].weight.double()
            peft_delta = mod.scaling["cat_ab"] * b @ a
            torch.testing.assert_close(merged.delta(mod_name).double(), peft_delta, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- conformance: every registered method


@pytest.mark.parametrize("method", list(METHODS))
def test_conformance(method):
    us32 = [u.to(torch.float32) for u in pool()]
    params = {"seed": 3, "dare": 0.3} if method in ("ties", "knots") else {}
    a = merge(us32, method, **params)
    b = merge(us32, method, **params)
    # shapes and dtype
    assert set(a.modules) == set(SHAPES)
    for n, m in a.modules.items():
        assert m.shape == SHAPES[n] and m.dtype == torch.float32
        assert torch.isfinite(m.delta()).all()
        # determinism under a seed
        assert torch.equal(m.delta(), b.delta(n))
    # weights respected: a zero weight is the same as leaving the update out …
    us64 = pool()
    z = merge(us64, method, [1.0, 0.0, 2.0, 1.0])
    d = merge([us64[0], us64[2], us64[3]], method, [1.0, 2.0, 1.0])
    assert_close(z, {n: d.delta(n).double() for n in d.modules}, tol=1e-7)
    # … and unequal weights change the result
    e = merge(us64, method, [1.0, 3.0, 1.0, 1.0])
    f = merge(us64, method)
    assert any((e.delta(n) - f.delta(n)).abs().max() > 1e-6 for n in e.modules)
    # provenance
    assert a.meta["merge"]["method"] == method and "version" in a.meta
    # the obvious route (what `--engine plain` merges with) is the same merge, dense
    ref = get_method(method).reference(us64, [1.0, 3.0, 1.0, 1.0])
    assert all(isinstance(m, Dense) for m in ref.modules.values())
    assert ref.meta["merge"] == e.meta["merge"]
    assert_close(e, {n: m.delta().double() for n, m in ref.modules.items()}, tol=1e-7)


def test_dare_changes_with_seed_and_rescales():
    us = pool()
    a = merge(us, "ties", dare=0.5, seed=0)
    b = merge(us, "ties", dare=0.5, seed=1)
    assert any((a.delta(n) - b.delta(n)).abs().max() > 0 for n in a.modules)
    # with one update, DARE keeps each entry with prob 1-p and rescales the survivors by 1/(1-p)
    u = random_update({"m": (40, 40)}, 40, scale=1.0, seed=5)
    m = merge([u], "ties", dare=0.25, seed=0).delta("m")
    kept = m != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(m[kept], u.delta("m")[kept] / 0.75)


def test_knots_rejects_dense_updates():
    d = Update({"m": Dense(torch.randn(4, 4))})
    with pytest.raises(MergeabilityError, match="low-rank"):
        merge([d, d], "knots")
    assert isinstance(merge([d, d], "ties").modules["m"], Dense)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda us: merge(us, "nope"), "unknown merge method"),
        (lambda us: merge(us, "mean", [1.0]), "weights for"),
        (lambda us: merge(us, "ties", density=0.0), "density"),
        (lambda us: merge(us, "ties", density=1.5), "density"),
        (lambda us: merge(us, "knots", dare=1.0), "dare"),
        (lambda us: merge(us, "mean", density=0.5), "takes no parameter density"),
        (lambda us: merge(us, "mean", [1.0, float("nan"), 1, 1]), "finite"),
        (lambda us: merge([], "mean"), "at least one"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(MergeabilityError, match=match):
        call(pool())


def test_mismatched_shapes_and_bases_are_errors():
    a = random_update({"m": (4, 4)}, 2)
    b = random_update({"m": (4, 5)}, 2)
    with pytest.raises(MergeabilityError, match="shape"):
        merge([a, b], "mean")
    c = random_update({"m": (4, 4)}, 2, base="other")
    with pytest.raises(MergeabilityError, match="different base models"):
        merge([a, c], "mean")
    bad = Update({"m": LowRank(torch.full((2, 4), float("nan")), torch.ones(4, 2))})
    with pytest.raises(MergeabilityError, match="NaN"):
        merge([a, bad], "ties")


def test_base_accuracy_weights():
    w = base_accuracy_weights([0.1, 0.9, 0.5], temperature=0.5)
    assert abs(sum(w) - 1) < 1e-12
    assert w[0] > w[2] > w[1]  # the least-known task weighs most
    flat = base_accuracy_weights([0.1, 0.9], temperature=1e6)
    assert abs(flat[0] - flat[1]) < 1e-5  # high T -> uniform
    with pytest.raises(MergeabilityError, match="temperature"):
        base_accuracy_weights([0.5], temperature=0)
    with pytest.raises(MergeabilityError, match=r"\[0, 1\]"):
        base_accuracy_weights([1.5], temperature=1)


def test_registry_parameters_are_typed_dataclasses():
    for name in METHODS:
        m = get_method(name)
        assert m.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: parameters are stored, not mutated
            m.lam = 2.0
