"""KnOTS: the reference route (SVD of the out × n·in concatenation) vs the low-rank route (QR + core SVD).

N = 11 updates of rank 64 on a 1536 × 576 module (SmolLM2-135M's mlp.up_proj), float64, measured side by side.
Prints the times, the relative difference of the merged ΔW, and `ratio: X` (dense time / low-rank time) last.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergeability.merging import Knots
from mergeability.updates import LowRank, Update


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out-features", type=int, default=1536)
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    name = "model.layers.15.mlp.up_proj"
    updates = [
        Update({name: LowRank(torch.randn(args.rank, args.in_features, generator=g, dtype=torch.float64) * 0.02,
                              torch.randn(args.out_features, args.rank, generator=g, dtype=torch.float64) * 0.02,
                              2.0)})
        for _ in range(args.n)
    ]
    method = Knots()
    t_dense, ref = best_of(lambda: method.reference(updates).delta(name), args.repeats)
    t_low, merged = best_of(lambda: method.merge(updates).delta(name), args.repeats)
    rel = ((merged - ref).norm() / ref.norm()).item()
    print(f"KnOTS, N={args.n} updates of rank {args.rank} on {args.out_features}x{args.in_features}, float64, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"dense route:    {t_dense * 1000:9.1f} ms")
    print(f"low-rank route: {t_low * 1000:9.1f} ms")
    print(f"relative difference of merged ΔW: {rel:.2e} ({'equal' if rel < 1e-6 else 'NOT equal'} to 1e-6)")
    print(f"ratio: {t_dense / t_low:.1f}")


if __name__ == "__main__":
    main()
