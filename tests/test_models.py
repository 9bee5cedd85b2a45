import pytest
import torch

from mergeability import MergeabilityError
from mergeability.models import (
    BUNDLED,
    cache_dir,
    decoder_layers,
    get_module,
    layer_index,
    load_model,
    module_name,
    num_layers,
)


def test_load_local_dir_and_find_modules(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert num_layers(lm.model) == 2
    name = module_name(lm.model, 1, "mlp.up_proj")
    assert name == "model.layers.1.mlp.up_proj" and layer_index(name) == 1
    assert get_module(lm.model, name).weight.shape == (64, 32)
    assert module_name(lm.model, -1, "self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token is not None


def test_model_errors(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    with pytest.raises(MergeabilityError, match="out of range: the model has 2 layers"):
        module_name(lm.model, 2, "mlp.up_proj")
    with pytest.raises(MergeabilityError, match="no module .*up_proj"):
        module_name(lm.model, 0, "mlp.gate")
    with pytest.raises(MergeabilityError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="float8")
    with pytest.raises(MergeabilityError, match="cannot load model"):
        load_model(str(tmp_path / "nowhere"))


def test_device_errors(tiny_model_dir, monkeypatch):
    from mergeability.models import check_device

    assert check_device("cpu").type == "cpu"
    with pytest.raises(MergeabilityError, match="unknown device 'gpu0'"):
        load_model(str(tiny_model_dir), device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MergeabilityError, match="--device cuda: .*use --device cpu"):
        load_model(str(tiny_model_dir), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MergeabilityError, match="only 1 CUDA device"):
        check_device("cuda:3")


def test_not_a_causal_lm_is_an_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(MergeabilityError, match="not a causal LM"):
        load_model(str(tmp_path / "bert"))


def test_layer_stacks_of_other_families():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1)
    for cfg, cls in ((Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM)):
        m = cls(cfg(**kw))
        assert len(decoder_layers(m)) == 3
        assert module_name(m, 1, "mlp.up_proj") == "model.layers.1.mlp.up_proj"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


@pytest.mark.integration
def test_bundled_model_loads_and_is_cached():
    lm = load_model(BUNDLED)
    assert num_layers(lm.model) == 30
    assert get_module(lm.model, module_name(lm.model, 15, "mlp.up_proj")).weight.shape == (1536, 576)
    assert (cache_dir() / BUNDLED / "model.safetensors").exists()
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = lm.model(ids).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode(top).strip() == "Paris"
