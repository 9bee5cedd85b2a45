import pytest
import torch

from mergeability.updates import LowRank, Update

torch.set_num_threads(2)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a local HF directory with a working tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory):
    """Still tiny, but wide enough (128 × 256 MLP) for merged updates of rank > 64."""
    return save_tiny(tmp_path_factory.mktemp("wide-llama"), hidden_size=128, intermediate_size=256)


def save_tiny(d, **kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**kw)).save_pretrained(d)
    vocab = {f"w{i}": i for i in range(124)} | {"<unk>": 124, "<s>": 125, "</s>": 126, "<pad>": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(d)
    return d


def random_update(shapes: dict, ranks, scale=None, seed=0, dtype=torch.float64, base="tiny") -> Update:
    """Random LoRA update; `shapes` maps module name -> (out, in); `ranks` an int or a per-module dict."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (o, i) in shapes.items():
        r = ranks[name] if isinstance(ranks, dict) else ranks
        s = scale if scale is not None else 2.0 / r
        mods[name] = LowRank(torch.randn(r, i, generator=g, dtype=dtype), torch.randn(o, r, generator=g, dtype=dtype), s)
    return Update(mods, base)


def word_facts(n=20, seed=0, n_rel=2):
    """PopQA-schema facts in the tiny tokenizer's vocabulary (w0..w123), multi-token answers."""
    import random

    from mergeability.data.facts import Fact

    rng = random.Random(seed)
    facts = []
    for i in range(n):
        rel = f"r{i % n_rel}"
        obj = " ".join(f"w{rng.randrange(60, 124)}" for _ in range(1 + i % 3))
        subj = f"w{i}"
        facts.append(Fact(f"f{i}", subj, rel, obj, float(100 + i), f"w{40 + i % n_rel} {subj} w50", (obj,),
                          f"{subj} w51 {obj} .\n{subj} w52 {obj} w53 .\nw{40 + i % n_rel} {subj} w50 {obj}"))
    return facts


def run_cli(args, capsys):
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    import sys

    from mergeability.cli import main

    old, sys.argv = sys.argv, ["mergeability", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
