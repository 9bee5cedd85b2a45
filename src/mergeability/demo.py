"""`mergeability demo`: load the bundled model, make a few LoRA updates, merge them every way, and compare.

This is the foundation's end-to-end check; the full example-level pipeline replaces it when it lands.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergeability.merging import METHODS, merge
from mergeability.models import BUNDLED, load_model, module_name, num_layers
from mergeability.updates import LowRank, Update, applied, load_update, save_update

PROMPT = "The capital of France is"
ANSWER = " Paris"


def _answer_logprob(model, tok) -> float:
    ids = tok(PROMPT + ANSWER, return_tensors="pt").input_ids
    n_prompt = len(tok(PROMPT).input_ids)
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    return logp[0, n_prompt - 1 : -1].gather(-1, ids[0, n_prompt:, None]).mean().item()


def run_demo(out: Path, *, seed: int = 0, n_updates: int = 6, rank: int = 8, console: Console) -> None:
    t0 = time.perf_counter()
    lm = load_model(BUNDLED)
    console.print(f"loaded {BUNDLED} in {time.perf_counter() - t0:.1f} s")
    name = module_name(lm.model, num_layers(lm.model) // 2, "mlp.up_proj")
    W = lm.model.get_submodule(name).weight
    g = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(n_updates):  # random LoRA updates about 5% the size of W
        A = torch.randn(rank, W.shape[1], generator=g) / W.shape[1] ** 0.5
        B = torch.randn(W.shape[0], rank, generator=g) * 0.05 * W.norm().item() / (W.shape[0] * rank) ** 0.5
        updates.append(Update({name: LowRank(A, B, 2.0)}, base_model=BUNDLED))

    base_lp = _answer_logprob(lm.model, lm.tokenizer)
    table = Table(title=f"{n_updates} rank-{rank} updates of {name}, merged")
    for col in ("method", "kind", "rank", "‖ΔW‖_F", "σ_max", "merge ms", f"log p({ANSWER.strip()!r}) Δ"):
        table.add_column(col, justify="right")
    for method in METHODS:
        t = time.perf_counter()
        merged = merge(updates, method)
        ms = (time.perf_counter() - t) * 1000
        m = merged.modules[name]
        with applied(lm.model, merged):
            lp = _answer_logprob(lm.model, lm.tokenizer)
        kind = type(m).__name__
        table.add_row(method, kind, str(m.rank) if kind == "LowRank" else "full", f"{m.fro_norm():.3f}",
                      f"{m.singular_values()[0].item():.3f}", f"{ms:.1f}", f"{lp - base_lp:+.4f}")
        if method == "knots":
            path = save_update(merged, out / "knots-merged", force=True)
            again = load_update(path)
            err = (again.delta(name) - merged.delta(name)).abs().max().item()
    console.print(table)
    console.print(f"base log p({ANSWER.strip()!r} | {PROMPT!r}) = {base_lp:.4f}")
    console.print(f"KnOTS merge saved as a PEFT adapter at {out / 'knots-merged'} (reload max |ΔW error| {err:.2e})")
