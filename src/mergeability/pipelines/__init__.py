"""End-to-end recipes: the example-level run and the task-level run, and what they share (`stages`).

`PIPELINES` maps a run's kind to how its model and data are prepared and how its trials are evaluated: the
experiments use it to rebuild a finished run's context, as Ray workers do.
"""

from mergeability.pipelines.examples import example_evaluator, prepare_examples, run_examples
from mergeability.pipelines.stages import WorkerSetup
from mergeability.pipelines.tasks import prepare_tasks, run_tasks, task_evaluator

PIPELINES = {  # kind -> (prepare(cfg) -> prepared, evaluator(prepared) -> evaluate(trials, merged))
    "examples": (prepare_examples, example_evaluator),
    "tasks": (prepare_tasks, task_evaluator),
}


def worker_setup(cfg) -> WorkerSetup:
    """What a worker runs to rebuild the evaluator of a run of `cfg.kind`."""
    prepare, evaluator = PIPELINES[cfg.kind]
    return WorkerSetup(cfg, prepare, evaluator)


__all__ = ["run_examples", "run_tasks", "PIPELINES", "worker_setup", "WorkerSetup"]
