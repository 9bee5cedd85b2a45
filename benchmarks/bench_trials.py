"""Mergeability trials through the plain path and the engine, side by side, on the bundled model.

The same trials (target update + N partners, merged with KnOTS, the target's item evaluated) run through
  plain:  update merged into the weights, full model, every option its own full sequence (the obvious path);
  engine: activation cache below the adapted layer, packed options, per-row low-rank updates, batched rows.
Prints seconds per trial for each, whether every prediction agreed, and `ratio: X` (plain / engine) last.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeability.data import build_items
from mergeability.data.geo import RELATIONS, answer_pool, build_geo
from mergeability.engine import Engine
from mergeability.estimate import plan_trials
from mergeability.merging import get_method
from mergeability.models import BUNDLED, load_model, module_name, num_layers
from mergeability.scoring import PlainScorer
from mergeability.updates import LowRank, Update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24, help="trials in all (targets × M)")
    ap.add_argument("--partners", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch-rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(BUNDLED)
    name = module_name(lm.model, num_layers(lm.model) // 2, "mlp.up_proj")
    W = lm.model.get_submodule(name).weight
    facts = build_geo(limit=30, seed=0)
    items = build_items(facts, pools={r: answer_pool(r) for r in RELATIONS})
    by_id = {it.id: it for it in items}
    # Updates shaped like trained ones (r = 64, alpha = 128, ‖ΔW‖ ≈ 30): random, seeded.
    g = torch.Generator().manual_seed(0)
    updates = {
        it.id: Update({name: LowRank(torch.randn(args.rank, W.shape[1], generator=g) / W.shape[1] ** 0.5,
                                     torch.randn(W.shape[0], args.rank, generator=g) * 0.01, 2.0)})
        for it in items
    }
    m = 4
    targets = sorted(updates)[: -(-args.trials // m)]
    plan = plan_trials(0, targets, sorted(updates), m, args.partners)[: args.trials]
    knots = get_method("knots")

    def run(scorer, chunk):
        t = time.perf_counter()
        out = []
        for s in range(0, len(plan), chunk):
            batch = plan[s : s + chunk]
            merged = [knots.merge([updates[p.target], *(updates[q] for q in p.partners)]) for p in batch]
            out += scorer.score([(by_id[p.target], u) for p, u in zip(batch, merged)])
        return (time.perf_counter() - t) / len(plan), out

    engine = Engine(lm.model, lm.tokenizer, [name], batch_rows=args.batch_rows)
    t_merge = time.perf_counter()
    for p in plan[:4]:
        knots.merge([updates[p.target], *(updates[q] for q in p.partners)])
    t_merge = (time.perf_counter() - t_merge) / 4
    t_eng, fast = run(engine, args.batch_rows)  # includes building the activation cache for these items
    t_plain, plain = run(PlainScorer(lm.model, lm.tokenizer), 1)
    agree = all(a.pred == b.pred for a, b in zip(fast, plain))
    err = max(max(abs(x - y) for x, y in zip(a.scores, b.scores)) for a, b in zip(fast, plain))
    print(f"{len(plan)} trials, N={args.partners} partners, KnOTS, rank {args.rank}, {name}, "
          f"{args.threads} threads, engine batch {args.batch_rows} rows")
    print(f"KnOTS merge alone:  {t_merge:7.3f} s/trial")
    print(f"plain path:         {t_plain:7.3f} s/trial")
    print(f"engine:             {t_eng:7.3f} s/trial")
    print(f"predictions agreed: {agree} (max option-score difference {err:.1e})")
    print(f"ratio: {t_plain / t_eng:.1f}")


if __name__ == "__main__":
    main()
