"""The task-level run (paper §3.2): base accuracy → one adapter per task (loaded or trained) → fine-tuned accuracy
→ threshold → mergeability trials scored by exact-match accuracy → scores.csv. Each stage does only what the
store does not already hold, so `--resume` continues any of them.

What is recorded per task besides the accuracies describes the data its adapter was trained on (its train split):
`answer_ppl` (paper A.5) is the base model's perplexity of the training answers given their prompts, answer
tokens only (`training.answer_perplexity`); `train_tokens` (A.6, "context length") the mean tokens of a training
sequence, prompt + answer + EOS (`training.training_tokens`). `prompt_tokens` is the mean test prompt, for
reference; it is not A.6."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from mergeability import run
from mergeability.analysis.summary import per_task_rows, task_summary
from mergeability.backends import check_backend
from mergeability.config import TaskConfig, validate
from mergeability.console import print_table, progress
from mergeability.data.pools import load_pool
from mergeability.errors import MergeabilityError
from mergeability.exact_match import evaluate_task
from mergeability.models import LoadedModel, get_module, module_name, num_layers
from mergeability.pipelines.stages import Outcome, WorkerSetup, finish, load_run_model, safe_name, trials_stage
from mergeability.training import answer_perplexity, train_task_update, training_tokens
from mergeability.updates import load_update, save_update

SCORE_COLUMNS = ["task", "score", "degradation", "base_acc", "ft_acc", "n_test", "train_loss", "answer_ppl",
                 "train_tokens", "prompt_tokens", "fro_norm", "top_sv"]
# An adapter the pool brings: its answer perplexity is measured on at most this many examples of its train split (a
# forward pass each; splits are shuffled, so a random sample). An adapter trained here has it from its training.
PPL_SAMPLE = 256


@dataclass
class PreparedTasks:
    cfg: TaskConfig
    lm: object
    tasks: list  # data.tasks.Task
    modules: list[str]
    notes: list[str] = field(default_factory=list)  # what loading the pool had to say (skipped datasets): the run
    #                                                 prints them once (Ray workers prepare too, and stay quiet)


def _base_of(adapter: Path) -> str | None:
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or JSON that is not an object
        return None


def check_bases(bases: Iterable[tuple[str, str | None]], model: str) -> None:
    """(adapter, its base model) pairs: adapters trained on another base model cannot be merged into this one."""
    for name, base in bases:
        if base and base != model and Path(base).name != Path(model).name:
            raise MergeabilityError(f"the adapter for {name} targets {base}, the run's model is {model}: "
                                    f"pass --model {base}, or use adapters trained on {model}")


def check_shapes(tasks, model, model_name: str) -> None:
    """Every adapter the pool brings fits the model's modules: a pool named for this model but trained on
    another still fails here, before any work."""
    for t in (t for t in tasks if t.adapter is not None):
        for name, m in load_update(t.adapter).modules.items():
            try:
                shape = tuple(get_module(model, name).weight.shape)
            except (AttributeError, MergeabilityError):
                raise MergeabilityError(f"the adapter for {t.name} adapts {name}, which {model_name} does not have: "
                                        "it was trained for another base model") from None
            if shape != m.shape:
                raise MergeabilityError(f"the adapter for {t.name} has shape {m.shape} at {name}, {model_name} has "
                                        f"{shape}: it was trained for another base model")


def prepare_tasks(cfg: TaskConfig) -> PreparedTasks:
    """Check the settings, load the pool and the model: all bad input is found here."""
    validate(cfg)  # every value, the method included (again: a config built in Python reaches here unchecked)
    m = cfg.merge
    check_backend(cfg)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    notes: list[str] = []
    tasks = load_task_pool(cfg, train_missing=cfg.data.train_missing, note=notes.append)
    if m.partners >= len(tasks):
        raise MergeabilityError(f"--partners {m.partners} is larger than the pool: at most {len(tasks) - 1} other "
                                f"tasks can exist with {len(tasks)} tasks")
    lm, modules = load_task_model(cfg, tasks)
    return PreparedTasks(cfg, lm, tasks, modules, notes)


def load_task_pool(cfg: TaskConfig, *, train_missing: bool, note=None) -> list:
    """The config's tasks, checked: each has a test split (and a train split if it has no adapter), and every
    adapter was trained on the run's model. What a run and a survey both need before any work.

    A local pool's tasks come as paths (`SplitFiles`): the check reads the test rows a run scores (`max_test`) and a
    train split's first row, and lets them go; each split is read again, as far as it is used, when its task's turn
    comes, so a run never holds more than one task's rows."""
    d = cfg.data
    sizes = {"train": d.train_size, "valid": max(1, d.test_size // 2), "test": d.test_size}  # the bundled suite's
    tasks = load_pool(d.pool, d.tasks, seed=cfg.seed, sizes=sizes, max_tasks=d.max_tasks,
                      train_missing=train_missing, note=note)
    for t in tasks:
        test_examples(cfg, t)  # a task with no test split cannot be scored: fail before any work
        if t.adapter is None:
            t.split("train", 1)  # the whole split is read where it is trained on, as far as the run uses it
    check_bases(((t.name, _base_of(t.adapter)) for t in tasks if t.adapter is not None), cfg.model.name)
    return tasks


def load_task_model(cfg: TaskConfig, tasks: list) -> tuple[LoadedModel, list[str]]:
    """The run's model and the modules its task adapters adapt, checked against the pool's adapters' shapes."""
    lm = load_run_model(cfg.model)
    layers = range(num_layers(lm.model)) if cfg.training.layers is None else cfg.training.layers
    modules = [module_name(lm.model, layer, t) for layer in layers for t in cfg.training.targets]
    check_shapes(tasks, lm.model, cfg.model.name)
    return lm, modules


def test_examples(cfg: TaskConfig, task) -> list:
    """The test rows a run scores: the first `max_test` (a local pool's file is read no further)."""
    return task.split("test", cfg.data.max_test)


def in_memory(cfg: TaskConfig, task, *, train: bool, max_train: int | None = None):
    """The task with the rows a run uses read once into memory: the test rows it scores (`max_test`) and, with
    `train`, at most `max_train` train rows (when it has any). Scoring, training and statistics then share them
    instead of reading a local pool's files again each time."""
    splits = {"test": test_examples(cfg, task)}
    rows = task.rows("train", max_train) if train else []
    if rows:
        splits["train"] = rows
    return replace(task, splits=splits)


def task_accuracy(cfg: TaskConfig, model, tok, task, update=None) -> tuple[float, list[bool], list[str]]:
    """(accuracy, per-example correctness, predictions) on the task's test examples, with the run's settings."""
    return evaluate_task(model, tok, test_examples(cfg, task), update, batch_size=cfg.data.eval_batch,
                         max_new_tokens=cfg.data.max_new_tokens)


def task_evaluator(prep: PreparedTasks):
    """evaluate(trials, merged) -> [Outcome]: each trial's task accuracy with its merged update."""
    by_name = {t.name: in_memory(prep.cfg, t, train=False) for t in prep.tasks}  # not a file read per trial
    model, tok = prep.lm.model, prep.lm.tokenizer

    def evaluate(trials, merged):
        out = []
        for t, m in zip(trials, merged):
            acc, correct, _ = task_accuracy(prep.cfg, model, tok, by_name[t.target], m)
            out.append(Outcome(acc, tuple(int(c) for c in correct)))
        return out

    return evaluate


def adapter_for(prep: PreparedTasks, task, out: Path):
    """(update, last-epoch loss or None, base answer perplexity of the training data, path) of a task: the pool's
    adapter, or one trained now on the train split and saved in the run directory. The perplexity is None for a
    pool adapter whose task has no train split: the data it was trained on is not there to measure."""
    cfg, model, tok = prep.cfg, prep.lm.model, prep.lm.tokenizer
    if task.adapter is not None:
        train = task.rows("train", PPL_SAMPLE)
        ppl = answer_perplexity(model, tok, train, cfg.training.batch_size) if train else None
        return load_update(task.adapter), None, ppl, str(task.adapter.resolve())
    update, stats = train_task_update(model, tok, task.split("train"), prep.modules, cfg.training, seed=cfg.seed,
                                      key=task.name, base_model=cfg.model.name)
    path = Path(run.UPDATES) / safe_name(task.name)
    save_update(update, out / path, force=True)
    return update, stats.loss, stats.base_ppl, str(path)


def measure_tasks(prep: PreparedTasks, store, out: Path, bars) -> None:
    """Base and fine-tuned accuracy per task, training the adapters the pool lacks."""
    cfg, model, tok = prep.cfg, prep.lm.model, prep.lm.tokenizer
    done = store.ids("tasks", "name")
    bar = bars.stage("tasks", len(prep.tasks), len(done & {t.name for t in prep.tasks}))
    for task in (in_memory(cfg, t, train=True) for t in prep.tasks if t.name not in done):
        base_acc, base_correct, _ = task_accuracy(cfg, model, tok, task)
        update, loss, ppl, path = adapter_for(prep, task, out)
        ft_acc, ft_correct, _ = task_accuracy(cfg, model, tok, task, update)
        test, train = task.splits["test"], task.splits.get("train")
        prompt_tokens = sum(len(tok(e.input).input_ids) for e in test) / len(test)
        store.add_task(dict(name=task.name, path=path, base_acc=base_acc, ft_acc=ft_acc,
                            base_correct=[int(c) for c in base_correct], ft_correct=[int(c) for c in ft_correct],
                            n_test=len(base_correct), train_loss=loss, answer_ppl=ppl, prompt_tokens=prompt_tokens,
                            train_tokens=training_tokens(tok, train) if train else None,
                            fro_norm=update.fro_norm(), top_sv=update.top_singular_value()))
        bar.advance()


def threshold_pools(prep: PreparedTasks, store, note=lambda text: None) -> dict[float, tuple[str, ...]]:
    """The pool at the threshold, then at each sweep threshold whose pool differs and can give N partners. The
    main threshold leaving fewer than N + 1 tasks is an error (before any trial); a sweep threshold that does is
    skipped, and `note` told why."""
    d, n = prep.cfg.data, prep.cfg.merge.partners
    names_here = {t.name for t in prep.tasks}
    pools: dict[float, tuple[str, ...]] = {}
    for th in [d.threshold, *d.sweep]:
        names = [t for t in store.tasks_reaching(th) if t in names_here]
        if th == d.threshold and len(names) == 0:
            best = max((r["ft_acc"] for r in store.task_rows()), default=0.0)
            raise MergeabilityError(f"no task reaches fine-tuned accuracy {d.threshold} (the best reaches "
                                    f"{best:.2f}): lower --threshold, then --resume")
        if th == d.threshold and len(names) <= n:
            raise MergeabilityError(f"only {len(names)} tasks reach fine-tuned accuracy {d.threshold}: lower "
                                    f"--partners below {len(names)} or --threshold, then --resume")
        if len(names) <= n:
            note(f"sweep threshold {th:g} skipped: {len(names)} task{'s' if len(names) != 1 else ''} reach it, "
                 f"N = {n} partners need {n + 1}")
        elif tuple(names) not in pools.values():
            pools[th] = tuple(names)
    return pools


def pool_trials(prep: PreparedTasks, store, out: Path, pools: dict, bars) -> None:
    """M trials per task of each threshold's pool (partners drawn from that pool)."""
    paths = {r["name"]: r["path"] for r in store.task_rows()}
    updates = {n: load_update(out / paths[n]) for names in pools.values() for n in names}
    setup = WorkerSetup(prep.cfg, prepare_tasks, task_evaluator)
    evaluate = task_evaluator(prep)
    for th, names in pools.items():
        trials_stage(prep.cfg, store, setup, evaluate, updates, list(names), run.pool_key(prep.cfg, names), bars,
                     f"trials≥{th:g}")


def score_rows(cfg: TaskConfig, store, pool: list[str]) -> list[dict]:
    sc = run.task_scores(cfg, store, pool)
    return [{**{c: r[c] for c in SCORE_COLUMNS[3:]}, "task": r["name"], "score": sc[r["name"]],
             "degradation": r["ft_acc"] - sc[r["name"]]} for r in store.task_rows() if r["name"] in sc]


def run_tasks(cfg: TaskConfig, out: Path, *, resume: bool = False, console: Console | None = None) -> dict:
    """Tasks → threshold pools → trials → scores.csv. Returns the summary."""
    console = console or Console()
    out = run.check_new(out, resume, cfg)  # a run of another kind is refused before the model loads
    timings = run.Timings()
    with timings.stage("load"):
        prep = prepare_tasks(cfg)  # all bad input is found here, before the run directory exists
    for p in prep.lm.model.parameters():
        p.requires_grad_(False)
    for text in prep.notes:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    store = run.create(out, cfg)
    notes = {"pool notes": " ".join(prep.notes)} if prep.notes else {}  # in the report's provenance table
    store.set_meta("provenance", run.provenance(cfg, pool=cfg.data.pool, scoring="exact match, greedy", **notes))
    with progress(console) as bars:
        with timings.stage("tasks"):
            measure_tasks(prep, store, out, bars)
        with timings.stage("trials"):
            pools = threshold_pools(prep, store, note=lambda text: console.print(text, markup=False, highlight=False))
            store.set_meta("pools", {str(k): list(v) for k, v in pools.items()})
            pool_trials(prep, store, out, pools, bars)
    pool = list(pools[cfg.data.threshold])
    summary = task_summary(cfg, store, pool)
    summary["timings"] = finish(out, store, timings, SCORE_COLUMNS, score_rows(cfg, store, pool))
    title = (f"task-level run: {summary['kept']} of {summary['tasks']} tasks reach fine-tuned accuracy "
             f"≥ {cfg.data.threshold:g}")
    print_table(console, title, ["task", "base acc", "fine-tuned acc", "mergeability score"], per_task_rows(summary))
    console.print(f"mean mergeability score {summary['mean_score']:.3f}; "
                  + "; ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return summary
