"""End-to-end recipes: the example-level run (`popqa`) and the task-level run (`tasks`)."""

from mergeability.pipelines.popqa import (
    PopqaEvaluator, _progress, _safe, open_run_dir, prepare_popqa, print_summary, run_key, run_popqa, scores, summarize,
    write_scores_csv,
)
from mergeability.pipelines.tasks import run_tasks

__all__ = ["run_popqa", "prepare_popqa", "PopqaEvaluator", "run_tasks", "run_key", "open_run_dir", "scores", "summarize",
           "write_scores_csv", "print_summary", "_progress", "_safe"]
