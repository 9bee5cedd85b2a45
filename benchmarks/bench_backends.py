"""The local and processes backends side by side: the same run (`run popqa --preset demo` by default) once in one
process on all cores, once with worker processes forked from the run (one torch thread each), each in a child
process of its own, one after the other. Prints each run's wall time and recorded stage timings, whether the two
scores.csv files are identical, and `ratio: X` last (processes' wall time / local's; below 1 is faster).

    python benchmarks/bench_backends.py --out runs/bench-backends [--items 70] [--dataset geo]

Nothing else should run meanwhile: both runs share the machine's cores with whatever does.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def run(out: Path, backend: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "mergeability.cli", "run", "popqa", "--preset", "demo", "--backend", backend,
           "--out", str(out), *extra]
    start = time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {rc}")
    return time.perf_counter() - start


def stages(out: Path) -> dict:
    db = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True)
    timings = json.loads(dict(db.execute("SELECT key, value FROM meta").fetchall()).get("timings", "{}"))
    return {k: round(v, 1) for k, v in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new directory: the two runs go inside it")
    ap.add_argument("--items", type=int, help="overrides the demo preset's items")
    ap.add_argument("--dataset", help="overrides the demo preset's dataset")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists: time fresh runs")
    extra = [x for flag in ("items", "dataset") if getattr(args, flag) is not None
             for x in (f"--{flag}", str(getattr(args, flag)))]
    wall = {b: run(args.out / b, b, extra) for b in ("local", "processes")}
    for b, t in wall.items():
        print(f"{b:9s} {t:7.1f} s  stages (s): {stages(args.out / b)}")
    same = (args.out / "local" / "scores.csv").read_bytes() == (args.out / "processes" / "scores.csv").read_bytes()
    print(f"scores.csv identical: {same}")
    print(f"ratio: {wall['processes'] / wall['local']:.2f}")


if __name__ == "__main__":
    main()
