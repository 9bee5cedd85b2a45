"""Per-item training batches in run order vs grouped by passage length, side by side, on the cached path.

A batch of the fast engine pads every row to its longest sequence, so which passages share a batch sets how many
padded tokens each of its steps computes. `training_batches` groups passages by token count; this trains the same
bundled-model geo passages in batches of `--batch`, once in run order and once sorted by length, from the same
initial factors, and prints the padded/real token ratio and seconds per update of each, the largest relative
difference of any update's ΔW between the two (float rounding: each row trains as it would alone), and
`ratio: X` (grouped time / run-order time; below 1 is faster) last.
"""

from __future__ import annotations

import argparse
import time

from bench_train import bundled_middle_up_proj

from mergeability.config import ItemTraining
from mergeability.data.geo import build_geo
from mergeability.engine import Engine
from mergeability.training import split_passage, train_updates_cached


def train_in(engine, name, cfg, passages, ids, order, batch) -> tuple[float, dict, float]:
    """(seconds, ΔW by id, padded/real tokens) training `order`'s passages in consecutive batches."""
    deltas, padded = {}, 0
    t = time.perf_counter()
    for s in range(0, len(order), batch):
        members = order[s : s + batch]
        padded += len(members) * max(passages[k][0].shape[1] for k in members)
        out = train_updates_cached(engine, [passages[k] for k in members], [ids[k] for k in members], [name], cfg,
                                   seed=0)
        deltas.update({ids[k]: u.delta(name) for k, (u, _) in zip(members, out)})
    real = sum(passages[k][0].shape[1] for k in order)
    return time.perf_counter() - t, deltas, padded / real


def geo_passages(items: int, threads: int):
    """(engine, module name, training config, passages, ids): the bundled model's middle up_proj and `items` geo
    passages, one sequence each."""
    lm, name = bundled_middle_up_proj(threads)
    cfg = ItemTraining()
    facts = build_geo(limit=items, seed=1)
    passages = [split_passage(lm.tokenizer, f.passage, cfg.max_tokens)[:1] for f in facts]  # one sequence each
    return Engine(lm.model, lm.tokenizer, [name]), name, cfg, passages, [f.id for f in facts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    engine, name, cfg, passages, ids = geo_passages(args.items, args.threads)
    run_order = list(range(len(ids)))
    by_length = sorted(run_order, key=lambda k: passages[k][0].shape[1])
    t_run, d_run, pad_run = train_in(engine, name, cfg, passages, ids, run_order, args.batch)
    t_len, d_len, pad_len = train_in(engine, name, cfg, passages, ids, by_length, args.batch)
    err = max(((d_len[i] - d_run[i]).norm() / d_run[i].norm()).item() for i in ids)
    print(f"{len(ids)} passages, batch {args.batch}, {cfg.epochs} epochs, {args.threads} threads")
    print(f"run order: padded/real tokens {pad_run:.2f}, {t_run / len(ids):6.2f} s/update")
    print(f"by length: padded/real tokens {pad_len:.2f}, {t_len / len(ids):6.2f} s/update")
    print(f"max relative ΔW difference: {err:.1e}")
    print(f"ratio: {t_len / t_run:.2f}")


if __name__ == "__main__":
    main()
