"""`mergeability report RUN_DIR`: the report of whichever kind of run the directory holds."""

from __future__ import annotations

from pathlib import Path

from mergeability import run
from mergeability.analysis.claims import Verdict
from mergeability.errors import MergeabilityError
from mergeability.report.examples import build_example_report
from mergeability.report.tasks import build_task_report

BUILDERS = {"examples": build_example_report, "tasks": build_task_report}


def build_report(run_dir: Path) -> tuple[Path, list[Verdict]]:
    """Write figures/, report.html and report.md into the run directory; return the HTML path and the claims."""
    run_dir = Path(run_dir)
    cfg, store = run.open_run(run_dir, lock=False)  # read-only: a report may be drawn while a run is live
    try:
        run.check_writable(run_dir, "the report")  # before any figure is drawn: nothing left half-written
    except MergeabilityError:
        store.close()
        raise
    try:
        return BUILDERS[cfg.kind](run_dir, cfg, store)
    finally:
        store.close()
