"""Task-level run (paper §3.2): base accuracy → one adapter per task (loaded or trained) → fine-tuned accuracy →
threshold → mergeability trials scored by exact-match accuracy → scores.csv. Each stage does only what the
store does not already hold, so `--resume` continues any of them."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from rich.console import Console
from rich.table import Table

from mergeability.config import TaskConfig
from mergeability.errors import MergeabilityError


@dataclass
class PreparedTasks:
    cfg: TaskConfig
    lm: object
    tasks: list  # data.tasks.Task
    modules: list[str]


def _base_of(adapter: Path) -> str | None:
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None


def check_bases(bases: Iterable[tuple[str, str | None]], model: str) -> None:
    """(adapter, its base model) pairs: adapters trained on another base model cannot be merged into this one."""
    for name, base in bases:
        if base and base != model and Path(base).name != Path(model).name:
            raise MergeabilityError(f"the adapter for {name} targets {base}, the run's model is {model}: "
                                    f"pass --model {base}, or use adapters trained on {model}")


def prepare_tasks(cfg: TaskConfig) -> PreparedTasks:
    from mergeability.data.tasks import load_pool
    from mergeability.merging import get_method
    from mergeability.models import get_module, load_model, module_name, num_layers

    if not 0.0 <= cfg.threshold <= 1.0 or any(not 0.0 <= t <= 1.0 for t in cfg.sweep):
        raise MergeabilityError(f"--threshold must be in [0, 1], got {cfg.threshold}")
    if cfg.trials <= 0 or cfg.partners < 0:
        raise MergeabilityError("--trials must be ≥ 1 and --partners ≥ 0")
    get_method(cfg.method, **cfg.method_params)
    from mergeability.backends import check_backend

    check_backend(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sizes = {"train": cfg.train_size, "valid": max(1, cfg.test_size // 2), "test": cfg.test_size}
    tasks = load_pool(cfg.pool, cfg.tasks, seed=cfg.seed, sizes=sizes)
    for t in tasks:
        t.split("test")  # a task with no test split cannot be scored: fail before any work
        if t.adapter is None:
            t.split("train")
    check_bases(((t.name, _base_of(t.adapter)) for t in tasks if t.adapter is not None), cfg.model)
    if cfg.partners >= len(tasks):
        raise MergeabilityError(f"--partners {cfg.partners} is larger than the pool: at most {len(tasks) - 1} other "
                                f"tasks can exist with {len(tasks)} tasks")
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    layers = range(num_layers(lm.model)) if cfg.layers is None else cfg.layers
    modules = [module_name(lm.model, layer, t) for layer in layers for t in cfg.targets]
    for t in tasks:  # shapes too: a pool named for this model but trained on another still fails here
        if t.adapter is not None:
            from mergeability.updates import load_update

            for name, m in load_update(t.adapter).modules.items():
                try:
                    shape = tuple(get_module(lm.model, name).weight.shape)
                except (AttributeError, MergeabilityError):
                    raise MergeabilityError(f"the adapter for {t.name} adapts {name}, which {cfg.model} does not have: "
                                            "it was trained for another base model") from None
                if shape != m.shape:
                    raise MergeabilityError(f"the adapter for {t.name} has shape {m.shape} at {name}, {cfg.model} has "
                                            f"{shape}: it was trained for another base model")
    return PreparedTasks(cfg, lm, tasks, modules)


def test_examples(cfg: TaskConfig, task) -> list:
    ex = task.split("test")
    return ex if cfg.max_test is None else ex[: cfg.max_test]


def task_accuracy(cfg: TaskConfig, model, tok, task, update=None) -> tuple[float, list[bool], list[str]]:
    """(accuracy, per-example correctness, predictions) on the task's test examples, with the run's settings."""
    from mergeability.exact_match import evaluate_task

    return evaluate_task(model, tok, test_examples(cfg, task), update, batch_size=cfg.eval_batch,
                         max_new_tokens=cfg.max_new_tokens)


def pool_key(cfg: TaskConfig, pool: list[str]) -> str:
    """The trial key: method, parameters, N, and the pool itself (partners are drawn from it)."""
    from mergeability.estimate import params_key

    digest = hashlib.sha256("\x1f".join(sorted(pool)).encode()).hexdigest()[:16]
    return params_key(cfg.method, {**cfg.method_params, "partners": cfg.partners, "pool": digest})


def kept_tasks(store, threshold: float) -> list[str]:
    return [r["name"] for r in store.rows("SELECT name FROM tasks WHERE ft_acc >= ? ORDER BY name", (threshold,))]


def run_tasks(cfg: TaskConfig, out: Path, *, resume: bool = False, console: Console | None = None) -> dict:
    from mergeability import __version__
    from mergeability.pipelines.popqa import _progress, _safe, check_out, start_run_dir
    from mergeability.training import TaskTrainConfig, answer_perplexity, train_task_lora
    from mergeability.updates import load_update, save_update

    console = console or Console()
    out = check_out(out, resume)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare_tasks(cfg)  # all bad input is found here, before the run directory exists
    timings["load"] = time.perf_counter() - t0
    model, tok = prep.lm.model, prep.lm.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    by_name = {t.name: t for t in prep.tasks}
    store = start_run_dir(out, cfg)
    store.set_meta("provenance", {"model": cfg.model, "revision": cfg.revision, "dtype": cfg.dtype, "seed": cfg.seed,
                                  "version": __version__, "pool": cfg.pool, "scoring": "exact match, greedy",
                                  "torch": torch.__version__})
    tcfg = TaskTrainConfig(rank=cfg.rank, alpha=cfg.alpha, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size)

    with _progress(console) as progress:
        # 1. base accuracy and fine-tuned accuracy per task, training the adapters the pool lacks
        t = time.perf_counter()
        done = store.ids("tasks", "name")
        bar = progress.add_task("tasks", total=len(prep.tasks), completed=len(done & set(by_name)))
        for task in prep.tasks:
            if task.name in done:
                continue
            base_acc, base_correct, _ = task_accuracy(cfg, model, tok, task)
            if task.adapter is not None:
                update, stats, path = load_update(task.adapter), None, str(task.adapter.resolve())
                data = task.splits.get("train") or task.split("test")
                ppl = answer_perplexity(model, tok, data[:64], cfg.batch_size)
            else:
                update, stats = train_task_lora(model, tok, task.split("train"), prep.modules, tcfg, seed=cfg.seed,
                                                key=task.name, base_model=cfg.model)
                save_update(update, out / "updates" / _safe(task.name), force=True)
                path = f"updates/{_safe(task.name)}"
                ppl = stats.passage_ppl
            ft_acc, ft_correct, _ = task_accuracy(cfg, model, tok, task, update)
            test = test_examples(cfg, task)
            prompt_tokens = sum(len(tok(e.input).input_ids) for e in test) / len(test)
            store.add_task(dict(name=task.name, path=path, base_acc=base_acc, ft_acc=ft_acc,
                                base_correct=[int(c) for c in base_correct], ft_correct=[int(c) for c in ft_correct],
                                n_test=len(base_correct), train_loss=stats.loss if stats else None,
                                answer_ppl=ppl, prompt_tokens=prompt_tokens,
                                fro_norm=update.fro_norm(), top_sv=update.top_singular_value()))
            progress.advance(bar)
        timings["tasks"] = time.perf_counter() - t

        # 2. trials for the pool at the threshold, then at each other threshold whose pool differs
        t = time.perf_counter()
        pools = {}
        for th in [cfg.threshold, *cfg.sweep]:
            names = [n for n in kept_tasks(store, th) if n in by_name]
            if th == cfg.threshold and len(names) == 0:
                best = max((r["ft_acc"] for r in store.rows("SELECT ft_acc FROM tasks")), default=0.0)
                raise MergeabilityError(f"no task reaches fine-tuned accuracy {cfg.threshold} (the best reaches "
                                        f"{best:.2f}): lower --threshold, then --resume")
            if th == cfg.threshold and len(names) <= cfg.partners:
                raise MergeabilityError(f"only {len(names)} tasks reach fine-tuned accuracy {cfg.threshold}: lower "
                                        f"--partners below {len(names)} or --threshold, then --resume")
            if len(names) > cfg.partners and tuple(names) not in pools.values():
                pools[th] = tuple(names)
        store.set_meta("pools", {str(k): list(v) for k, v in pools.items()})
        updates = {}
        for names in pools.values():
            for n in names:
                if n not in updates:
                    row = store.rows("SELECT path FROM tasks WHERE name = ?", (n,))[0]
                    updates[n] = load_update(out / row["path"])
        from mergeability.backends import pool_for

        evaluate = TaskEvaluator.build(cfg, model, tok, prep.tasks)
        with pool_for(cfg, TaskEvaluator(cfg), evaluate, updates) as workers:
            for th, names in pools.items():
                run_pool_trials(cfg, store, list(names), updates, evaluate, progress, f"trials≥{th:g}", workers)
        timings["trials"] = time.perf_counter() - t

    pool = list(pools[cfg.threshold])
    summary = summarize_tasks(store, cfg, pool)
    write_task_scores(store, cfg, pool, out / "scores.csv")
    store.set_meta("timings", timings)
    store.close()
    summary["timings"] = timings
    print_task_summary(summary, console)
    return summary


class TaskEvaluator:
    """Builds, inside a worker, what evaluates trials of a task-level run: the model and the tasks. Picklable."""

    def __init__(self, cfg: TaskConfig):
        import dataclasses

        self.cfg = dataclasses.replace(cfg, threads=None)

    def __call__(self):
        prep = prepare_tasks(self.cfg)
        return self.build(self.cfg, prep.lm.model, prep.lm.tokenizer, prep.tasks)

    @staticmethod
    def build(cfg: TaskConfig, model, tok, tasks):
        by_name = {t.name: t for t in tasks}
        return lambda trials, merged: [task_accuracy(cfg, model, tok, by_name[t.target], m)
                                       for t, m in zip(trials, merged)]


def run_pool_trials(cfg: TaskConfig, store, pool: list[str], updates: dict, evaluate, progress, label: str,
                    workers=None) -> None:
    """M trials per task of `pool`, each merging it with N partners from the pool; a trial's result is the
    task's exact-match accuracy with the merged update."""
    from mergeability.estimate import plan_trials, run_trials

    key = pool_key(cfg, pool)
    plan = plan_trials(cfg.seed, pool, pool, cfg.trials, cfg.partners)
    done = store.done_trials(cfg.method, key)
    bar = progress.add_task(label, total=len(plan), completed=sum((p.target, p.trial) in done for p in plan))

    def record(trial, res):
        acc, correct, _ = res
        store.add_trial(dict(target=trial.target, trial=trial.trial, method=cfg.method, params=key,
                             partners=list(trial.partners), correct=acc, probs=[int(c) for c in correct]))
        progress.advance(bar)

    run_trials(plan, updates, cfg.method, cfg.method_params, evaluate, record, done, chunk=1, pool=workers)


def task_scores(store, cfg: TaskConfig, pool: list[str]) -> dict[str, float]:
    """Mergeability score per task: its mean exact-match accuracy over the M trials."""
    from mergeability.pipelines.popqa import scores

    return scores(store, pool_key(cfg, pool), pool, cfg.trials)


def summarize_tasks(store, cfg: TaskConfig, pool: list[str]) -> dict:
    rows = store.rows("SELECT name, base_acc, ft_acc FROM tasks ORDER BY name")
    sc = task_scores(store, cfg, pool)
    return {"tasks": len(rows), "kept": len(pool), "threshold": cfg.threshold,
            "per_task": [{**r, "score": sc.get(r["name"])} for r in rows],
            "mean_score": sum(sc.values()) / max(len(sc), 1)}


def write_task_scores(store, cfg: TaskConfig, pool: list[str], path: Path) -> None:
    sc = task_scores(store, cfg, pool)
    rows = store.rows("SELECT name, base_acc, ft_acc, n_test, train_loss, answer_ppl, prompt_tokens, fro_norm, top_sv "
                      "FROM tasks ORDER BY name")
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        cols = ["task", "score", "degradation", "base_acc", "ft_acc", "n_test", "train_loss", "answer_ppl",
                "prompt_tokens", "fro_norm", "top_sv"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            if r["name"] not in sc:
                continue
            vals = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k != "name"}
            w.writerow({**vals, "task": r["name"], "score": f"{sc[r['name']]:.6g}",
                        "degradation": f"{r['ft_acc'] - sc[r['name']]:.6g}"})
    os.replace(tmp, path)


def print_task_summary(s: dict, console: Console) -> None:
    t = Table(title=f"task-level run: {s['kept']} of {s['tasks']} tasks reach fine-tuned accuracy ≥ {s['threshold']:g}")
    for col in ("task", "base acc", "fine-tuned acc", "mergeability score"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for r in s["per_task"]:
        t.add_row(r["name"], f"{r['base_acc']:.2f}", f"{r['ft_acc']:.2f}", "—" if r["score"] is None else f"{r['score']:.2f}")
    console.print(t)
    console.print(f"mean mergeability score {s['mean_score']:.3f}; "
                  + "; ".join(f"{k} {v:.1f} s" for k, v in s.get("timings", {}).items()))
