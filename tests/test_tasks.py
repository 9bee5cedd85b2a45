"""Task-level pieces: pool layout and name resolution, schema errors, exact match, generation and task training
against their plain references."""

import json
import math

import pytest
import torch

from conftest import random_update
from mergeability import MergeabilityError
from mergeability.data.tasks import Example, load_local_pool, match_adapters, read_split, task_number


def test_task_numbers_match_whatever_the_padding():
    assert task_number("task001_country_capital") == 1
    assert task_number("Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task1") == 1
    assert task_number("Mistral-7B-Instruct-v0.2-4b-r16-task022") == 22
    assert task_number("task1391_winogrande_easy_answer_generation") == 1391
    assert task_number("no-number-here") is None
    adapters = ["Mistral-7B-Instruct-v0.2-4b-r16-task1", "Mistral-7B-Instruct-v0.2-4b-r16-task022",
                "Mistral-7B-Instruct-v0.2-4b-r16-task1391"]
    pairs = match_adapters(["task001_a", "task22_b", "task1391_c", "task7_d"], adapters)
    assert pairs == {"task001_a": adapters[0], "task22_b": adapters[1], "task1391_c": adapters[2]}
    with pytest.raises(MergeabilityError, match="two adapters for task 1"):
        match_adapters(["task001_a"], ["x-task1", "y-task001"])


def write_split(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_pool_pairs_adapters_and_reads_parquet(tmp_path):
    import pandas as pd

    from mergeability.updates import save_update

    root = tmp_path / "pool"
    for name in ("task001_x", "task22_y"):
        write_split(root / "datasets" / name / "test.jsonl", [{"id": "a", "input": "w1 w2", "output": ["w3", "w4"]}])
    train = pd.DataFrame([{"id": "p", "input": "w5", "output": ["w6"]}])
    train.to_parquet(root / "datasets" / "task22_y" / "train.parquet")
    save_update(random_update({"model.layers.0.self_attn.q_proj": (32, 32)}, 2, base="tiny"),
                root / "adapters" / "Mistral-7B-Instruct-v0.2-4b-r16-task022")
    pool = load_local_pool(root)
    assert [t.name for t in pool] == ["task001_x", "task22_y"]
    assert pool[0].adapter is None and pool[1].adapter.name.endswith("task022")
    assert pool[0].split("test")[0] == Example("a", "w1 w2", ("w3", "w4"))
    assert pool[1].split("train")[0].outputs == ("w6",)
    with pytest.raises(MergeabilityError, match="task001_x has no train split"):
        pool[0].split("train")
    assert [t.name for t in load_local_pool(root, ["task22"])] == ["task22_y"]
    assert [t.name for t in load_local_pool(root, ["1", "task0022"])] == ["task001_x", "task22_y"]
    with pytest.raises(MergeabilityError, match="no task 'task9'"):
        load_local_pool(root, ["task9"])


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "output": ["x"]}, "row 2: missing column 'input'"),
    ({"id": "a", "input": "q"}, "row 2: missing column 'output'"),
    ({"id": "a", "input": "q", "output": [1, 2]}, "row 2, column 'output'"),
    ({"id": "a", "input": "", "output": "x"}, "row 2, column 'input'"),
])
def test_split_schema_errors_name_file_row_and_column(tmp_path, row, message):
    p = tmp_path / "test.jsonl"
    write_split(p, [{"id": "ok", "input": "q", "output": "x"}, row])
    with pytest.raises(MergeabilityError, match=message) as e:
        read_split(p)
    assert str(p) in str(e.value)


def test_bundled_suite_is_deterministic_with_disjoint_splits():
    from mergeability.data.suite import TASKS, build_suite

    suite = build_suite(seed=3)
    assert len(suite) == len(TASKS) >= 12
    again = build_suite(seed=3)
    for t, u in zip(suite, again):
        assert t.splits == u.splits
        inputs = [e.input for s in ("train", "valid", "test") for e in t.split(s)]
        assert len(set(inputs)) == len(inputs)  # no instance in two splits
        assert all(e.input.endswith("Output:") and e.outputs[0] for e in t.split("test"))
    assert build_suite(seed=4)[0].splits != suite[0].splits


def test_bundled_suite_tasks_have_disjoint_inputs_and_formats():
    """No input is asked of two tasks (each adapter owns its inputs), down to the shape of the input: with each
    digit, lowercase run and capitalised word reduced to one symbol, every task's shapes are its own."""
    import re

    from mergeability.data.suite import build_suite

    suite = build_suite(train=64, valid=50, test=100)  # the bundled preset's sizes
    instances = {t.name: set(t.meta["instances"]) for t in suite}
    assert all(len(x) == 64 + 50 + 100 + 1 for x in instances.values())
    shape = lambda x: re.sub(r"[a-z]+", "a", re.sub(r"[A-Z][a-z]*", "A", re.sub(r"[0-9]", "9", x)))  # noqa: E731
    shapes = {n: {shape(x) for x in xs} for n, xs in instances.items()}
    for a in suite:
        for b in suite:
            if a.name < b.name:
                assert not instances[a.name] & instances[b.name], (a.name, b.name)
                assert not shapes[a.name] & shapes[b.name], (a.name, b.name)


def test_a_suite_whose_tasks_share_an_input_is_refused(monkeypatch):
    from mergeability.data import suite

    definition, gen = suite.TASKS["task001_copy_word"]
    monkeypatch.setitem(suite.TASKS, "task099_copy_again", ("Say the word again.", gen))  # same inputs, same rng
    with pytest.raises(MergeabilityError, match="share the input"):
        suite.build_suite(["task001_copy_word", "task099_copy_again"])


def test_exact_match_normalisation():
    from mergeability.exact_match import exact_match, normalize_answer

    assert normalize_answer("  Paris. ") == "paris"
    assert exact_match("PARIS", ["Lyon", "paris"])
    assert exact_match('"forty-two"', ["forty-two"])
    assert exact_match("a", ["A"]) and not exact_match("a", ["an"])  # articles are content here
    assert not exact_match("Paris France", ["Paris"])
    assert exact_match("new  york", ["New York"])


def greedy_reference(model, ids, n, stop):
    """The obvious greedy decoder: full forward each step, no cache, no padding; stops after a stop token."""
    ids = torch.tensor([ids])
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if nxt.item() in stop:
            break
    return ids[0].tolist()


def test_batched_generation_matches_plain_greedy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeability.exact_match import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = " ".join(f"w{j}" for j in range(30, 40))  # a task's definition: run once per batch
    prompts = [" ".join(f"w{(7 * i + j) % 120}" for j in range(3 + i % 5)) for i in range(9)]  # ragged lengths
    prompts += [shared + " " + p for p in prompts]
    from mergeability.batching import common_prefix

    assert common_prefix([tok(p).input_ids for p in prompts[9:]]) >= 10
    batched = generate(model, tok, prompts, max_new_tokens=4, batch_size=4)
    assert batched[9:] == generate(model, tok, prompts[9:], max_new_tokens=4, batch_size=9)
    with torch.no_grad():
        for p, got in zip(prompts, batched):
            ids = tok(p).input_ids
            ref = tok.decode(greedy_reference(model, ids, 4, {tok.eos_token_id})[len(ids):], skip_special_tokens=True)
            assert got == ref.split("\n")[0].strip()


def test_evaluate_task_with_update_equals_weights_added(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeability.exact_match import evaluate_task, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    upd = random_update({"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.1.mlp.up_proj": (64, 32)}, 4,
                        scale=1.0, dtype=torch.float32)
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
    with torch.no_grad():
        for name, m in upd.modules.items():
            model.get_submodule(name).weight += m.delta()
        want = generate(model, tok, prompts, max_new_tokens=2)
        for name, m in upd.modules.items():
            model.get_submodule(name).weight -= m.delta()
    ex = [Example(str(i), p, (w,)) for i, (p, w) in enumerate(zip(prompts, want))]
    acc, correct, preds = evaluate_task(model, tok, ex, upd, max_new_tokens=2)
    assert preds == want and acc == 1.0
    assert evaluate_task(model, tok, ex, max_new_tokens=2)[2] == generate(model, tok, prompts, max_new_tokens=2)


def test_too_long_prompt_is_an_error_not_a_truncation(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeability.exact_match import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(MergeabilityError, match="exceeds the model's context of 64"):
        generate(model, tok, [" ".join(["w1"] * 70)], max_new_tokens=2)


def test_task_training_fast_loss_matches_full_logits_training(tiny_model_dir):
    """Head-only-on-answers training gives the same ΔW as HF's full-logits loss (1e-4 relative), and learns."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeability.config import TaskTraining
    from mergeability.training import answer_loss, answer_perplexity, task_batches, train_task_update
    from mergeability.updates import applied

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # a shared prompt prefix (the fast route runs it once per batch) and ragged lengths (padding)
    ex = [Example(str(i), f"w20 w21 w22 w{i} w{i + 3}" + " w9" * (i % 3), (f"w{60 + i % 4} w{70 + i % 3}",))
          for i in range(10)]
    from mergeability.training import shared_prefix

    batches = task_batches(tok, ex, 4)
    assert shared_prefix(batches[0][0], batches[0][2]) == 3
    for batch in batches:
        assert torch.allclose(answer_loss(model, *batch), answer_loss(model, *batch, plain=True), atol=1e-6)
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    cfg = TaskTraining(rank=4, alpha=8, lr=1e-2, epochs=3, batch_size=4)
    fast, fs = train_task_update(model, tok, ex, mods, cfg, seed=0, key="t")
    plain, ps = train_task_update(model, tok, ex, mods, cfg, seed=0, key="t", plain=True)
    for name in mods:
        a, b = fast.delta(name), plain.delta(name)
        assert a.norm() > 0
        assert ((a - b).norm() / b.norm()).item() < 1e-4
    assert abs(fs.loss - ps.loss) < 1e-4
    base_ppl = answer_perplexity(model, tok, ex, 4)
    assert abs(fs.base_ppl - base_ppl) < 1e-6 * base_ppl and abs(ps.base_ppl - base_ppl) < 1e-4 * base_ppl
    assert fs.input_tokens == round(sum(len(tok(e.input).input_ids) for e in ex) / len(ex))
    # Micro-batches (steps of 4 rows of ~14 tokens split into 1, 2 and 3 rows at a time) give the same update and loss.
    from dataclasses import replace

    from mergeability.training import micro_batches

    assert [len(m[0]) for m in micro_batches(batches[0], 2 * batches[0][0].shape[1] + 1)] == [2, 2]
    assert [len(m[0]) for m in micro_batches(batches[0], 1)] == [1, 1, 1, 1]  # at least one row, however long
    for tokens in (1, 2 * batches[0][0].shape[1], 3 * batches[0][0].shape[1]):
        micro, ms = train_task_update(model, tok, ex, mods, replace(cfg, micro_tokens=tokens), seed=0, key="t")
        for name in mods:
            a, b = micro.delta(name), fast.delta(name)
            assert ((a - b).norm() / b.norm()).item() < 1e-5
        assert abs(ms.loss - fs.loss) < 1e-5
    # It learned. Both sides in nats per answer token: the base model's answer NLL is log(base_ppl) = 4.88; the
    # last epoch's training loss (measured 4.73) and the trained model's answer NLL (4.69) must sit below it by a
    # margin that lr = 1e-9 (no learning: 4.88 both) cannot reach.
    assert fs.loss < math.log(fs.base_ppl) - 0.1
    with applied(model, fast):
        assert math.log(answer_perplexity(model, tok, ex, 4)) < math.log(base_ppl) - 0.1
    assert fast.meta["training"] == {"update": "lora", "lr": 1e-2, "epochs": 3, "seed": 0, "rank": 4, "alpha": 8}


def test_hub_pool_lists_the_org_and_pairs_by_number(tmp_path, monkeypatch):
    """The hub path, with the hub replaced by local files: listing, filtering, padding-blind pairing, splits."""
    import sys
    import types

    import huggingface_hub

    from mergeability.data.tasks import load_hub_pool

    datasets_dir = tmp_path / "hub"
    for name in ("task001_alpha", "task1391_beta"):
        for split in ("train", "test"):
            write_split(datasets_dir / name / f"{split}.jsonl",
                        [{"id": f"{name}-{split}", "input": "Q", "output": ["A", "a."]}])
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    ids = lambda names: [types.SimpleNamespace(id=f"Lots-of-LoRAs/{n}") for n in names]  # noqa: E731
    monkeypatch.setattr(huggingface_hub.HfApi, "list_models", lambda self, author: ids(
        ["Mistral-7B-Instruct-v0.2-4b-r16-task1", "Mistral-7B-Instruct-v0.2-4b-r16-task1391", "something-else"]))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_datasets", lambda self, author: ids(
        ["task001_alpha", "task1391_beta", "README"]))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: downloads.append(repo) or str(adapter_dir))

    def load_dataset(name):
        local = datasets_dir / name.split("/", 1)[1]
        return {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in local.glob("*.jsonl")}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pool = load_hub_pool()
    assert [t.name for t in pool] == ["task001_alpha", "task1391_beta"]
    assert downloads == ["Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task1",
                         "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task1391"]
    assert pool[1].split("test")[0].outputs == ("A", "a.") and "valid" not in pool[1].splits
    assert [t.name for t in load_hub_pool(["task1391"])] == ["task1391_beta"]
