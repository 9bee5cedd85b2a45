import inspect
import sys

import pytest
import torch

from mergeability.updates import LowRank, Update

torch.set_num_threads(2)

SUBPROCESS_TIMEOUT_S = 300  # a test that starts a process: tighter than the 600 s backstop of pyproject.toml


def pytest_collection_modifyitems(config, items):
    """A test that starts a process (its code calls subprocess) and sets no timeout of its own gets
    SUBPROCESS_TIMEOUT_S: a child that hangs fails its test in minutes, whichever module it is in."""
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        try:
            code = inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            continue
        if "subprocess" in code or "Popen" in code:
            item.add_marker(pytest.mark.timeout(SUBPROCESS_TIMEOUT_S))


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_running():
    """A module that leaves Ray running (RayPool starts one when none is up) would hand its cluster, processes
    and environment to every later module, and a 2-CPU module fixture would then fail to start its own."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this module left Ray running: start and shut it down in a fixture (see tests/test_ray.py)")


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
        mods[name] = LowRank(torch.randn(r, i, generator=g, dtype=dtype), torch.randn(o, r, generator=g, dtype=dtype),
                             s)
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


# ------------------------------------------------------------------ shared run helpers
# Helpers more than one test module uses live here (not in a test module that others import): `dataset`,
# `cfg_for` (example-level runs), `task_cfg_for`, `make_pool` and `write_rows` (task-level runs).

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A PopQA-schema JSONL file of `word_facts()`: the data of example-level runs on the tiny model."""
    import json

    p = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = [dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop, question=f.question,
                 possible_answers=json.dumps(list(f.possible_answers)), passage=f.passage) for f in word_facts()]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def cfg_for(model_dir, dataset, **kw):
    """An example-level run's config on the tiny model, small enough for a test; `kw` overrides."""
    from mergeability.config import from_flat

    base = dict(model=str(model_dir), dataset=str(dataset), items=20, layer=1, rank=4, alpha=8, lr=0.05,
                trials=3, partners=2, seed=0)
    return from_flat("examples", **{**base, **kw})


def task_cfg_for(model_dir, pool, **kw):
    """A task-level run's config on the tiny model and a `make_pool` pool; `kw` overrides."""
    from mergeability.config import from_flat

    base = dict(model=str(model_dir), pool=str(pool), threshold=0.0, sweep=[], rank=4, alpha=8, lr=0.05, epochs=4,
                batch_size=8, trials=3, partners=2, max_new_tokens=1, seed=0, targets=TARGETS)
    return from_flat("tasks", **{**base, **kw})


def write_rows(path, rows):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_pool(root, model_dir, n_weak=4, n_strong=0, n=16):
    """A local task pool. Weak tasks answer a constant token the base model never says (base accuracy 0);
    strong tasks answer what the base model already says next (base accuracy 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeability.exact_match import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for k in range(n_weak + n_strong):
        prompts = [f"w{k} w{(3 * i + k) % 50} w{(5 * i) % 40 + 50} w99" for i in range(2 * n)]
        if k < n_weak:
            outs = [f"w{110 + k}"] * len(prompts)
        else:
            outs = generate(model, tok, prompts, max_new_tokens=1)
        rows = [{"id": f"{k}-{i}", "input": p, "output": [o]} for i, (p, o) in enumerate(zip(prompts, outs))]
        kind = "weak" if k < n_weak else "strong"
        write_rows(root / "datasets" / f"task{k + 1:03d}_{kind}" / "train.jsonl", rows[:n])
        write_rows(root / "datasets" / f"task{k + 1:03d}_{kind}" / "test.jsonl", rows[n:])
    return root


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
