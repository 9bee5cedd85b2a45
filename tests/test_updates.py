import copy
import json

import pytest
import torch

from conftest import random_update
from mergeability import MergeabilityError, load_update, merge, save_update
from mergeability.updates import Dense, LowRank, Update, applied

PEFT_CONFIGS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["up_proj", "q_proj", "v_proj"],
                     rank_pattern={"model.layers.1.mlp.up_proj": 6, "q_proj": 2}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=8, lora_alpha=4, target_modules=["up_proj", "down_proj"], use_rslora=True),
}


def _randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_saved_adapter_gives_same_logits_as_ours(tiny_model, tmp_path, kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = copy.deepcopy(tiny_model)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(**PEFT_CONFIGS[kind]))
    _randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))

    upd = load_update(tmp_path / "peft")
    if kind == "patterns":
        assert upd.modules["model.layers.1.mlp.up_proj"].rank == 6
        assert upd.modules["model.layers.0.self_attn.q_proj"].rank == 2
        assert upd.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 4)
    else:
        assert upd.modules["model.layers.0.mlp.up_proj"].scale == pytest.approx(4 / 8**0.5)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path / "peft").eval()
    with applied(base, upd):
        ours = _logits(base, ids)
    torch.testing.assert_close(ours, _logits(reloaded, ids), rtol=1e-4, atol=1e-5)
    # applied() restores the weights bit for bit
    for (n, p), (_, q) in zip(base.named_parameters(), tiny_model.named_parameters()):
        assert torch.equal(p, q), n

    # and the other direction: our save, PEFT's load
    save_update(upd, tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, ids), ours, rtol=1e-4, atol=1e-5)


def test_merged_dense_update_saves_as_exact_peft_adapter(tiny_model, tmp_path):
    from peft import PeftModel

    shapes = {"model.layers.0.mlp.up_proj": (64, 32), "model.layers.1.mlp.down_proj": (32, 64)}
    us = [random_update(shapes, 4, seed=i, dtype=torch.float32, base=None) for i in range(3)]
    merged = merge(us, "ties")
    assert all(isinstance(m, Dense) for m in merged.modules.values())
    save_update(merged, tmp_path / "m")
    back = load_update(tmp_path / "m")
    for n in shapes:
        torch.testing.assert_close(back.delta(n), merged.delta(n), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "m" / "mergeability.json").read_text())["merge"]["method"] == "ties"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path / "m").eval()
    ids = torch.randint(0, 128, (1, 8))
    with applied(tiny_model, merged):
        ours = _logits(tiny_model, ids)
    torch.testing.assert_close(_logits(peft_model, ids), ours, rtol=1e-4, atol=1e-5)


def test_norms_from_factors_match_dense():
    u = random_update({"a": (50, 30), "b": (30, 30)}, {"a": 5, "b": 7}, seed=3)
    for m in u.modules.values():
        d = m.delta()
        assert m.fro_norm() == pytest.approx(torch.linalg.norm(d).item(), rel=1e-10)
        torch.testing.assert_close(m.singular_values(), torch.linalg.svdvals(d)[: m.rank], rtol=1e-10, atol=1e-12)
    total = sum(torch.linalg.norm(u.delta(n)) ** 2 for n in u.modules) ** 0.5
    assert u.fro_norm() == pytest.approx(total.item(), rel=1e-10)
    assert u.top_singular_value() == pytest.approx(max(torch.linalg.svdvals(u.delta(n))[0].item() for n in u.modules))


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    u = random_update({"model.layers.0.mlp.up_proj": (8, 4)}, 2, dtype=torch.float32)
    save_update(u, tmp_path / "x")
    with pytest.raises(MergeabilityError, match="already exists"):
        save_update(u, tmp_path / "x")
    save_update(u, tmp_path / "x", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary leftovers


def _saved(tmp_path, name="a"):
    u = random_update({"model.layers.0.mlp.up_proj": (8, 4)}, 2, dtype=torch.float32)
    return save_update(u, tmp_path / name)


def test_load_errors(tmp_path):
    with pytest.raises(MergeabilityError, match="no such adapter directory"):
        load_update(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeabilityError, match="no adapter_config.json"):
        load_update(tmp_path / "empty")
    d = _saved(tmp_path, "trunc")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeabilityError, match="unreadable or truncated"):
        load_update(d)
    d = _saved(tmp_path, "badjson")
    (d / "adapter_config.json").write_text("{nope")
    with pytest.raises(MergeabilityError, match="invalid JSON"):
        load_update(d)
    d = _saved(tmp_path, "rank")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeabilityError, match="rank 2 but the config says r=3"):
        load_update(d)


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _saved(tmp_path)
    st = load_file(d / "adapter_model.safetensors")
    key = next(k for k in st if "lora_B" in k)
    st[key][0, 0] = float("inf")
    save_file(st, d / "adapter_model.safetensors")
    with pytest.raises(MergeabilityError, match="NaN or infinite"):
        load_update(d)


def test_applied_rejects_wrong_shapes_and_modules(tiny_model):
    bad = Update({"model.layers.0.mlp.up_proj": Dense(torch.zeros(3, 3))})
    with pytest.raises(MergeabilityError, match="shape"):
        with applied(tiny_model, bad):
            pass
    missing = Update({"model.layers.0.mlp.nope": Dense(torch.zeros(3, 3))})
    with pytest.raises(MergeabilityError, match="no module"):
        with applied(tiny_model, missing):
            pass
    assert isinstance(LowRank(torch.zeros(1, 2), torch.zeros(3, 1)).shape, tuple)
