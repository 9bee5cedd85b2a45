"""Mergeability trials through the plain path and the engine, side by side, on the bundled model.

The same trials (target update + N partners, merged with KnOTS, the target's item evaluated) run through
  plain:  what `--engine plain` does, the obvious computation end to end: KnOTS by its reference route (every
          ΔW_i materialised, SVD of the out × N·in concatenation), ΔW added to the weights, the full model,
          every option its own full sequence;
  engine: KnOTS on the low-rank route, activation cache below the adapted layer, packed options, per-row
          low-rank updates, batched rows.
Prints seconds per trial for each (merge and scoring apart), whether the predictions agreed, and
`ratio: X` (plain / engine, whole trials) last. The engine's scoring is also checked against the plain scorer
on the very same merged updates (the parity the tests assert).
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


def run(plan, updates, by_id, scorer, merge, chunk):
    """The trials through one path, `chunk` at a time: (merge s/trial, scoring s/trial, scores, merged updates)."""
    t_merge = t_score = 0.0
    merged_all, out = [], []
    for s in range(0, len(plan), chunk):
        batch = plan[s : s + chunk]
        t = time.perf_counter()
        merged = [merge([updates[p.target], *(updates[q] for q in p.partners)]) for p in batch]
        t_merge += time.perf_counter() - t
        t = time.perf_counter()
        out += scorer.score([(by_id[p.target], u) for p, u in zip(batch, merged)])
        t_score += time.perf_counter() - t
        merged_all += merged
    return t_merge / len(plan), t_score / len(plan), out, merged_all


def compare(a, b):
    """(predictions that agree, largest option-score difference) of two lists of ItemScores."""
    agree = sum(x.pred == y.pred for x, y in zip(a, b))
    return agree, max(max(abs(u - v) for u, v in zip(x.scores, y.scores)) for x, y in zip(a, b))


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

    engine = Engine(lm.model, lm.tokenizer, [name], batch_rows=args.batch_rows)
    plain = PlainScorer(lm.model, lm.tokenizer)
    # The engine's time includes building the activation cache for these items.
    e_merge, e_score, fast, fast_merged = run(plan, updates, by_id, engine, knots.merge, args.batch_rows)
    p_merge, p_score, slow, _ = run(plan, updates, by_id, plain, knots.reference, 1)
    same = plain.score([(by_id[p.target], u) for p, u in zip(plan, fast_merged)])  # untimed parity check

    t_plain, t_eng = p_merge + p_score, e_merge + e_score
    print(f"{len(plan)} trials, N={args.partners} partners, KnOTS, rank {args.rank}, {name}, "
          f"{args.threads} threads, engine batch {args.batch_rows} rows")
    print(f"{'s/trial':20s} {'merge':>8s} {'score':>8s} {'total':>8s}")
    print(f"{'plain path':20s} {p_merge:8.3f} {p_score:8.3f} {t_plain:8.3f}")
    print(f"{'engine':20s} {e_merge:8.3f} {e_score:8.3f} {t_eng:8.3f}")
    print(f"{'ratio':20s} {p_merge / e_merge:8.1f} {p_score / e_score:8.1f} {t_plain / t_eng:8.1f}")
    agree, err = compare(fast, same)
    print(f"same merged updates, engine vs plain scoring: {agree}/{len(plan)} predictions agreed, "
          f"max option-score difference {err:.1e}")
    agree, err = compare(fast, slow)
    print(f"end to end (each path its own KnOTS route): {agree}/{len(plan)} predictions agreed, "
          f"max option-score difference {err:.1e}")
    print(f"ratio: {t_plain / t_eng:.1f}")


if __name__ == "__main__":
    main()
