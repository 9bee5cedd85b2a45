"""Task-level hot paths, plain vs fast, side by side on the bundled model and suite.

- evaluation: greedy generation of a task's test set, every prompt in full (left-padded) vs the shared
  prompt prefix run once per batch; predictions must agree.
- training: a task adapter (r = 16 on q/k/v of every layer) with HF's full-logits loss on whole sequences vs
  the fast loss (shared prefix once per batch, output head only at answer positions); ΔW must agree.

Prints seconds for each and `ratio: X` last (fast time / plain time over both; below 1 is faster).
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeability import exact_match
from mergeability.config import TaskTraining
from mergeability.data.suite import build_suite
from mergeability.models import BUNDLED, load_model, module_name, num_layers
from mergeability.training import train_task_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="task013_add,task004_country_region,task006_copy_word")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(BUNDLED)
    model, tok = lm.model, lm.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    mods = [module_name(model, layer, t) for layer in range(num_layers(model))
            for t in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    tasks = build_suite(args.tasks.split(","), train=48, test=24)
    times = {"eval plain": 0.0, "eval fast": 0.0, "train plain": 0.0, "train fast": 0.0}
    agree, worst = True, 0.0
    for task in tasks:
        ex = task.split("test")
        preds = {}
        for kind, min_shared in (("plain", 10**9), ("fast", exact_match.MIN_SHARED)):
            old, exact_match.MIN_SHARED = exact_match.MIN_SHARED, min_shared
            t = time.perf_counter()
            preds[kind] = exact_match.evaluate_task(model, tok, ex, batch_size=32)[2]
            times[f"eval {kind}"] += time.perf_counter() - t
            exact_match.MIN_SHARED = old
        agree &= preds["plain"] == preds["fast"]
        deltas = {}
        for kind in ("plain", "fast"):
            t = time.perf_counter()
            upd, _ = train_task_update(model, tok, task.split("train"), mods, TaskTraining(epochs=1), seed=0,
                                       key=task.name, plain=kind == "plain")
            times[f"train {kind}"] += time.perf_counter() - t
            deltas[kind] = upd
        for name in mods:
            a, b = deltas["fast"].delta(name), deltas["plain"].delta(name)
            worst = max(worst, ((a - b).norm() / b.norm()).item())
        print(f"{task.name}: done")
    for k, v in times.items():
        print(f"{k}: {v / len(tasks):.2f} s per task")
    print(f"eval ratio: {times['eval fast'] / times['eval plain']:.2f}; predictions agree: {agree}")
    print(f"train ratio: {times['train fast'] / times['train plain']:.2f}; max relative ΔW difference: {worst:.1e}")
    fast, plain = times["eval fast"] + times["train fast"], times["eval plain"] + times["train plain"]
    print(f"ratio: {fast / plain:.2f}")


if __name__ == "__main__":
    main()
