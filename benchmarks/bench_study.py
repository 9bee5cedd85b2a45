"""The study preset against its budget: `mergeability run popqa --preset study` (run, experiments, report) in a
child process, its wall time and peak memory as shares of the budget (45 minutes, 4 GB on a 2-core CPU), and the
stage timings the run recorded. Not a test: it takes most of an hour.

Memory is the peak over the run of the summed PSS of the run's process tree (sampled every second): the study
preset forks worker processes, which share the model's pages with the run, so the largest single RSS would
undercount and a sum of RSS would count the shared pages once per process.

    python benchmarks/bench_study.py --out runs/study-wikidata [--dataset geo --items 400] [--model gemma3-270m]

Prints `wall: X of budget` and `memory: Y of budget` last (below 1 is inside the budget). Resumes like the run does:
time a fresh directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

BUDGET_S = 45 * 60  # the budget on this 2-core machine
BUDGET_RSS = 4 * 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new run directory")
    ap.add_argument("--dataset", help="overrides the preset's dataset (wikidata)")
    ap.add_argument("--items", type=int, help="overrides the preset's items")
    ap.add_argument("--model", help="overrides the preset's model (smollm2-135m)")
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists: time a fresh directory")
    cmd = [sys.executable, "-m", "mergeability.cli", "run", "popqa", "--preset", "study", "--out", str(args.out)]
    for flag in ("dataset", "items", "model"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    peak = [0]
    sampler = threading.Thread(target=sample_pss, args=(child, peak), daemon=True)
    sampler.start()
    rc = child.wait()
    wall = time.perf_counter() - start
    sampler.join()
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB: the largest process
    db = sqlite3.connect(f"file:{args.out / 'results.sqlite'}?mode=ro", uri=True)
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    kept = db.execute("SELECT COUNT(*) FROM updates WHERE kept = 1").fetchone()[0]
    trials = db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    print(f"exit {rc}; kept updates {kept}; trials {trials}; leakage {meta.get('leakage')}")
    print(f"run stages (s): {json.loads(meta.get('timings', '{}'))}")
    print(f"wall {wall / 60:.1f} min, peak PSS of the process tree {peak[0] / 2**30:.2f} GiB "
          f"(largest single RSS {rss / 2**30:.2f} GiB)")
    print(f"wall: {wall / BUDGET_S:.2f} of budget")
    print(f"memory: {peak[0] / BUDGET_RSS:.2f} of budget")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone between the listing and the read
            pass
    return out


def pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample_pss(child: subprocess.Popen, peak: list[int]) -> None:
    while child.poll() is None:
        peak[0] = max(peak[0], sum(pss(p) for p in set(tree(child.pid))))
        time.sleep(1.0)


if __name__ == "__main__":
    main()
