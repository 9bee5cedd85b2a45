"""How torch's CPU threads share a machine with other jobs: OpenMP's wait policy, set before torch loads.

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp). By default a libgomp worker that has
finished its share of a region spins (about 300,000 polls) before it sleeps, so that the next region starts a
few microseconds sooner. Alone, that is a small gain. Beside a second job on the same cores it is a large loss:
each process's spinning threads hold the cores the other's working threads need, and every region of both waits
for a time slice (measured: see `benchmarks/bench_sharing.py` and docs/scaling.md). A passive wait policy makes a
finished worker sleep at once; the cost alone is measured there too.

libgomp reads the variables once, when torch loads it; so the package's `__init__` imports this module before
anything imports torch. A value the user set wins, and nothing changes when torch was imported first (then the
policy is already fixed: set the variable in the environment instead).
"""

from __future__ import annotations

import os
import sys

OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # a finished worker sleeps at once instead of spinning


def configure_openmp() -> dict[str, str]:
    """Set each of OPENMP_ENV that the user left unset, if torch has not loaded yet; returns what it set."""
    if "torch" in sys.modules:
        return {}
    applied = {k: v for k, v in OPENMP_ENV.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


APPLIED = configure_openmp()
