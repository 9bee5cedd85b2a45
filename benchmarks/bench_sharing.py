"""Two jobs on one machine: each job's time beside another, over its time alone, under two OpenMP wait policies.

Workloads (each in its own process, the model or the updates built before the clock starts):
  merge   a KnOTS merge of 24 rank-32 LoRA updates on 14 modules of 512 × 512 (float32)
  train   one batch of the cached training path: 4 geo passages of the bundled model, r = 64, 3 epochs

Policies:
  spin      torch's default: the child imports torch before mergeability, so libgomp starts with its default
            wait policy (finished workers spin before they sleep)
  library   the child imports mergeability first, which sets OMP_WAIT_POLICY=PASSIVE (mergeability/threads.py)

Scenarios: each workload alone; each beside a second process looping the `train` workload (a run beside it).
Every process uses `--threads` torch threads (default: all cores, the library's default). A job beside another
that passes `--cap` × its solo time is stopped and reported as "> cap". Prints a table and, last,
`ratio: X` — the worst side-by-side / solo ratio under the library's policy (the issue's target: ≤ 2.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("spin", "library")
WORKLOADS = ("merge", "train")


def build(work: str):
    """The workload as a zero-argument function, everything it needs already built."""
    import torch

    from mergeability.merging import Knots
    from mergeability.updates import LowRank, Update

    if work == "merge":
        g = torch.Generator().manual_seed(0)
        names = [f"model.layers.{i}.mlp.up_proj" for i in range(14)]
        updates = [Update({n: LowRank(torch.randn(32, 512, generator=g) * 0.02, torch.randn(512, 32, generator=g),
                                      2.0) for n in names}) for _ in range(24)]
        return lambda: Knots().merge(updates)
    from mergeability.config import ItemTraining
    from mergeability.data.geo import build_geo
    from mergeability.engine import Engine
    from mergeability.models import BUNDLED, load_model, module_name, num_layers
    from mergeability.training import split_passage, train_updates_cached

    lm = load_model(BUNDLED)
    name = module_name(lm.model, num_layers(lm.model) // 2, "mlp.up_proj")
    cfg = ItemTraining(epochs=3)
    facts = build_geo(limit=4, seed=1)
    passages = [split_passage(lm.tokenizer, f.passage, cfg.max_tokens) for f in facts]
    engine = Engine(lm.model, lm.tokenizer, [name])
    return lambda: train_updates_cached(engine, passages, [f.id for f in facts], [name], cfg, seed=0)


def child(work: str, policy: str, threads: int, loop: bool) -> None:
    """Build, say "ready", wait for "go" on stdin, run (once and print the seconds, or forever in the background)."""
    if policy == "spin":
        import torch  # noqa: F401  (first: libgomp starts with its own default, mergeability then sets nothing)
    import mergeability  # noqa: F401, I001  (sets the wait policy if torch has not loaded yet)
    import torch  # noqa: I001

    torch.set_num_threads(threads)
    fn = build(work)
    print("ready", flush=True)
    sys.stdin.readline()
    while loop:
        fn()
    t = time.perf_counter()
    fn()
    print(f"{time.perf_counter() - t:.3f}", flush=True)


def start(work: str, policy: str, threads: int, loop: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cmd = [sys.executable, __file__, "--child", work, "--policy", policy, "--threads", str(threads)]
    proc = subprocess.Popen(cmd + (["--loop"] if loop else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"benchmark child {work}/{policy} failed to start")
    return proc


def timed(work: str, policy: str, threads: int, beside: str | None, limit: float) -> float | None:
    """Seconds of one `work` run, alone or beside a looping `beside` process; None past `limit` seconds."""
    background = start(beside, policy, threads, loop=True) if beside else None
    fg = start(work, policy, threads)
    try:
        if background:
            background.stdin.write("go\n")
            background.stdin.flush()
            time.sleep(1.0)  # the background job is in its stride when the clock starts
        fg.stdin.write("go\n")
        fg.stdin.flush()
        out, _ = fg.communicate(timeout=limit)
        return float(out.strip())
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in (fg, background):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=3, help="solo runs (the median is the solo time)")
    ap.add_argument("--cap", type=float, default=12.0, help="stop a side-by-side job at this × its solo time")
    ap.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    ap.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.policy, args.threads, args.loop)
    print(f"{os.cpu_count()} cores, {args.threads} torch threads per process; side by side = beside a looping train")
    print(f"{'workload':8} {'policy':8} {'solo s':>8} {'beside s':>9} {'ratio':>7}")
    worst = 0.0
    for policy in POLICIES:
        for work in WORKLOADS:
            solo = statistics.median(timed(work, policy, args.threads, None, 600) for _ in range(args.repeats))
            pair = timed(work, policy, args.threads, "train", args.cap * solo)
            ratio = pair / solo if pair is not None else float("inf")
            shown = f"{pair:9.2f} {ratio:6.2f}×" if pair is not None else f"{'>':>3}{args.cap * solo:6.1f} >{args.cap}×"
            print(f"{work:8} {policy:8} {solo:8.2f} {shown}", flush=True)
            if policy == "library":
                worst = max(worst, ratio)
    print(f"ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
