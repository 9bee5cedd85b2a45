"""Training batch sizes side by side: the same length-sorted passages trained in batches of each `--batches` size.

The fast engine trains a batch's passages as rows of one forward/backward pass, so a larger batch amortises the
per-step overhead over more rows but pads more. This trains the bundled model's geo passages sorted by length (as
`training_batches` orders them) at every size, from the same initial factors, and prints seconds per update and the
padded/real token ratio of each, the largest relative ΔW difference from the first size (rounding: each row trains
as it would alone), and `ratio: X` (last size's time / first size's; below 1 is faster) last.
"""

from __future__ import annotations

import argparse

from bench_train_grouping import geo_passages, train_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40)  # as many as the 90-item demo trained (docs/scaling.md)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    engine, name, cfg, passages, ids = geo_passages(args.items, args.threads)
    by_length = sorted(range(len(ids)), key=lambda k: passages[k][0].shape[1])
    runs = [(b, *train_in(engine, name, cfg, passages, ids, by_length, b)) for b in args.batches]  # 4 8 4: drift
    first, last = runs[0], runs[-1]
    print(f"{len(ids)} passages sorted by length, {cfg.epochs} epochs, {args.threads} threads")
    for b, t, deltas, pad in runs:
        err = max(((deltas[i] - first[2][i]).norm() / first[2][i].norm()).item() for i in ids)
        print(f"batch {b:2d}: padded/real tokens {pad:.2f}, {t / len(ids):6.2f} s/update, "
              f"max relative ΔW difference {err:.1e}")
    print(f"ratio: {last[1] / first[1]:.2f}")


if __name__ == "__main__":
    main()
