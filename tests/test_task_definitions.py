"""What the task-level features are, checked on a known case with the tiny model: the context length (paper A.6)
is the mean token count of the training sequences (prompt + answer + EOS), not the test prompt; the answer
perplexity (A.5) is exp(mean NLL of the training answers' tokens given their prompts) under the base model; the
report says both in words. And thresholds that leave fewer than N + 1 tasks: an error for the run's threshold, a
note and a skip for a sweep threshold."""

import math
import types

import pytest
import torch
from rich.console import Console

from conftest import random_update, task_cfg_for, write_rows
from mergeability import MergeabilityError
from mergeability.pipelines import run_tasks
from mergeability.pipelines.tasks import PreparedTasks, threshold_pools
from mergeability.store import Store
from mergeability.updates import save_update

QUIET = Console(quiet=True)


def definitions_pool(root, model_dir):
    """Three tasks whose training prompts (6 words) are longer than their test prompts (3 words), with answers of
    one or two words; task 3 brings its own adapter, the others are trained by the run."""
    for k in range(3):
        train = [{"id": f"{k}-{i}", "input": f"w{k} w{(3 * i + k) % 50} w{(5 * i) % 40 + 50} w97 w98 w99",
                  "output": [f"w{110 + k}" + (" w120" if i % 3 == 0 else ""), "w121"]} for i in range(10)]
        test = [{"id": f"{k}-t{i}", "input": f"w{k} w{i} w99", "output": f"w{110 + k}"} for i in range(6)]
        write_rows(root / "datasets" / f"task{k + 1:03d}_t{k}" / "train.jsonl", train)
        write_rows(root / "datasets" / f"task{k + 1:03d}_t{k}" / "test.jsonl", test)
    shapes = {f"model.layers.{i}.self_attn.{m}": (32 if m == "q_proj" else 16, 32) for i in range(2)
              for m in ("q_proj", "k_proj", "v_proj")}
    save_update(random_update(shapes, 2, base=str(model_dir), dtype=torch.float32),
                root / "adapters" / "adapter-task3")
    return root


def by_hand(model_dir, train_rows):
    """(mean tokens of prompt + ' ' + first reference + EOS, exp(mean NLL of the answer and EOS tokens)) with a
    plain forward pass of the base model per example: the definitions, computed without the pipeline's code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths, nll, n = [], 0.0, 0
    for row in train_rows:
        prompt = tok(row["input"]).input_ids
        answer = tok(" " + row["output"][0], add_special_tokens=False).input_ids + [tok.eos_token_id]
        lengths.append(len(prompt) + len(answer))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        # the token at position j is predicted by the logits at j - 1
        nll -= sum(logp[len(prompt) + j - 1, a].item() for j, a in enumerate(answer))
        n += len(answer)
    return sum(lengths) / len(lengths), math.exp(nll / n)


def test_context_length_and_perplexity_are_the_training_data_s(tiny_model_dir, tmp_path):
    import json

    from mergeability.report.build import build_report

    pool = definitions_pool(tmp_path / "pool", tiny_model_dir)
    out = tmp_path / "run"
    run_tasks(task_cfg_for(tiny_model_dir, pool, trials=1, partners=1), out, console=QUIET)
    store = Store(out / "results.sqlite", lock=False)
    rows = {r["name"]: r for r in store.task_rows()}
    store.close()
    assert rows["task003_t2"]["train_loss"] is None  # the pool's adapter: measured, not trained
    for name, r in rows.items():
        train = [json.loads(x) for x in (pool / "datasets" / name / "train.jsonl").read_text().splitlines()]
        tokens, ppl = by_hand(tiny_model_dir, train)
        assert r["train_tokens"] == pytest.approx(tokens, abs=1e-9)  # 6 + 1 or 2 + EOS: 8.4, not an integer
        assert tokens == pytest.approx(8.4) and r["prompt_tokens"] == 3  # … and not the test prompt
        assert r["answer_ppl"] == pytest.approx(ppl, rel=1e-4), name
    lines = (out / "scores.csv").read_text().splitlines()
    assert "train_tokens" in lines[0].split(",")
    build_report(out)
    md = (out / "report.md").read_text()
    assert "A.6: the training context length" in md and "Not the test prompt" in md
    assert "A.5: the base model's perplexity of the answers of the task's training examples" in md
    assert "Longer training contexts go with higher scores (A.6)" in md


def test_a_store_from_before_train_tokens_reads_and_resumes(tmp_path):
    """A store whose tasks table has no train_tokens column (written before it existed) opens read-only as it is,
    and a writer adds the column without changing the schema version."""
    import sqlite3

    path = tmp_path / "results.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE tasks DROP COLUMN train_tokens;")
    db.execute("INSERT INTO tasks (name, ft_acc) VALUES ('task001_a', 1.0)")
    db.commit()
    db.close()
    reader = Store(path, lock=False, read_only=True)
    assert "train_tokens" not in reader.task_rows()[0]
    reader.close()
    writer = Store(path)
    assert writer.task_rows()[0]["train_tokens"] is None and writer.get_meta("schema_version") == 2
    writer.close()


def prepared(tmp_path, ft_accs: dict[str, float], **kw):
    """A store holding tasks with these fine-tuned accuracies, and the run's prepared state around it."""
    store = Store(tmp_path / "results.sqlite")
    for name, acc in ft_accs.items():
        store.add_task({"name": name, "ft_acc": acc, "base_acc": 0.0})
    cfg = task_cfg_for("tiny", tmp_path, **kw)
    tasks = [types.SimpleNamespace(name=n) for n in ft_accs]
    return PreparedTasks(cfg, None, tasks, []), store


def test_a_sweep_threshold_with_too_few_tasks_is_skipped_with_a_note(tmp_path):
    prep, store = prepared(tmp_path, {"a": 1.0, "b": 0.9, "c": 0.5, "d": 0.2}, threshold=0.5, sweep=[0.9, 0.0],
                           partners=2)
    notes = []
    pools = threshold_pools(prep, store, note=notes.append)
    assert pools == {0.5: ("a", "b", "c"), 0.0: ("a", "b", "c", "d")}
    assert notes == ["sweep threshold 0.9 skipped: 2 tasks reach it, N = 2 partners need 3"]


def test_the_run_threshold_with_too_few_tasks_is_an_error(tmp_path):
    prep, store = prepared(tmp_path, {"a": 1.0, "b": 0.9, "c": 0.5}, threshold=0.9, sweep=[0.0], partners=2)
    notes = []
    with pytest.raises(MergeabilityError, match=r"^only 2 tasks reach fine-tuned accuracy 0.9: lower --partners "
                                                r"below 2 or --threshold, then --resume$"):
        threshold_pools(prep, store, note=notes.append)
    assert notes == []
