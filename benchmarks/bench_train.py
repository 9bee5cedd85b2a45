"""Per-item LoRA training: PEFT on the full model vs this package's cached path, side by side.

Both train r = 64, alpha = 128 on mlp.up_proj of the middle layer, lr 4e-3, 10 epochs, from the same initial
factors, on the bundled model's geo passages. The cached path (`train_updates_cached`) runs the frozen layers
below the adapted one once per passage instead of once per step, one passage at a time and several per batch.
Prints seconds per update, the largest relative difference of the trained ΔW, and `ratio: X` (cached time in
batches / PEFT time; below 1 is faster) last.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeability.config import ItemTraining
from mergeability.data.geo import build_geo
from mergeability.engine import Engine
from mergeability.models import BUNDLED, load_model, module_name, num_layers
from mergeability.training import init_factors, split_passage, train_updates_cached


def bundled_middle_up_proj(threads: int):
    """The bundled model on `threads` CPU threads, and the module the item updates train: the middle layer's up_proj."""
    torch.set_num_threads(threads)
    lm = load_model(BUNDLED)
    return lm, module_name(lm.model, num_layers(lm.model) // 2, "mlp.up_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="passages trained together on the cached path")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    lm, name = bundled_middle_up_proj(args.threads)
    cfg = ItemTraining()
    facts = build_geo(limit=args.items, seed=1)
    passages = [split_passage(lm.tokenizer, f.passage, cfg.max_tokens) for f in facts]

    peft_model = get_peft_model(lm.model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                     target_modules=[name]))
    lora = peft_model.base_model.model.get_submodule(name)
    t = time.perf_counter()
    peft_deltas = []
    for f, seqs in zip(facts, passages):
        A0, _ = init_factors(tuple(lora.base_layer.weight.shape), cfg.rank, 0, f"{f.id}/{name}")
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(A0)
            lora.lora_B["default"].weight.zero_()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.step_lr, weight_decay=0.0)
        for _ in range(cfg.epochs):
            for ids in seqs:
                loss = peft_model(ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        peft_deltas.append(lora.scaling["default"] * delta.detach())
    t_peft = (time.perf_counter() - t) / len(facts)
    model = peft_model.unload()  # the plain base model again

    engine = Engine(model, lm.tokenizer, [name])
    t = time.perf_counter()
    single = [train_updates_cached(engine, [seqs], [f.id], [name], cfg, seed=0)[0][0].delta(name)
              for f, seqs in zip(facts, passages)]
    t_single = (time.perf_counter() - t) / len(facts)
    t = time.perf_counter()
    batched = []
    for s in range(0, len(facts), args.batch):
        out = train_updates_cached(engine, passages[s : s + args.batch], [f.id for f in facts[s : s + args.batch]],
                                   [name], cfg, seed=0)
        batched += [u.delta(name) for u, _ in out]
    t_cached = (time.perf_counter() - t) / len(facts)
    rel = lambda xs: max(((a - b).norm() / b.norm()).item() for a, b in zip(xs, peft_deltas))  # noqa: E731
    err = max(rel(single), rel(batched))
    print(f"{len(facts)} updates, r={cfg.rank}, {cfg.epochs} epochs, {name}, {args.threads} threads, "
          f"mean passage {sum(sum(s.shape[1] for s in p) for p in passages) / len(passages):.0f} tokens "
          f"in {sum(len(p) for p in passages) / len(passages):.1f} sequences")
    print(f"PEFT, full model: {t_peft:6.2f} s/update")
    print(f"cached, 1 a time: {t_single:6.2f} s/update")
    print(f"cached, batch {args.batch}:  {t_cached:6.2f} s/update")
    print(f"max relative ΔW difference: {err:.1e}")
    print(f"ratio: {t_cached / t_peft:.2f}")


if __name__ == "__main__":
    main()
