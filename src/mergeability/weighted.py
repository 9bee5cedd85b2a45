"""`mergeability experiment weighted RUN_DIR` (paper §6, Fig. 7): merge tasks the base model knows little with
tasks it knows well, plainly and with base-accuracy weights softmax((1 − acc)/T), and compare what each task
keeps. The paper shows one set of four tasks; this repeats over many random sets, sweeps T, and applies the
weights inside every merge method, so the change in retained accuracy comes with a confidence interval.

Retained accuracy of a task = accuracy after the merge / fine-tuned accuracy.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from mergeability.config import TaskConfig
from mergeability.errors import MergeabilityError

NAME = "weighted"


@dataclass(frozen=True)
class WeightedSpec:
    sets: int = 8  # random task sets
    low: int = 2  # tasks per set from the weaker half by base accuracy
    high: int = 2  # tasks per set from the stronger half
    temperature: float = 0.5  # T of the weights for every method
    sweep: tuple[float, ...] = (0.1, 0.25, 1.0, 2.0)  # other T, with the mean merge
    methods: tuple[str, ...] = ("mean", "ties", "knots")

    def check(self) -> None:
        if any(not (t > 0 and math.isfinite(t)) for t in (self.temperature, *self.sweep)):
            raise MergeabilityError(f"temperatures must be > 0, got {[self.temperature, *self.sweep]}")
        if self.sets < 1 or self.low < 1 or self.high < 1:
            raise MergeabilityError("--sets, --low and --high must be at least 1")


def task_sets(base_acc: dict[str, float], spec: WeightedSpec, seed: int) -> list[tuple[list[str], list[str]]]:
    """(weak, strong) per set: weak from the lower half of tasks by base accuracy, strong from the upper half."""
    ranked = sorted(base_acc, key=lambda n: (base_acc[n], n))
    half = len(ranked) // 2
    weak, strong = ranked[:half], ranked[len(ranked) - half :]
    if len(weak) < spec.low or len(strong) < spec.high:
        raise MergeabilityError(f"{len(ranked)} tasks cannot give {spec.low} weak and {spec.high} strong ones per "
                                "set: lower --low/--high, or lower the run's threshold to keep more tasks")
    out = []
    for s in range(spec.sets):
        rng = random.Random(f"{seed}/weighted/{s}")
        out.append((sorted(rng.sample(weak, spec.low)), sorted(rng.sample(strong, spec.high))))
    return out


def units(spec: WeightedSpec, sets) -> list[tuple[str, dict]]:
    """One merge each: (set, method, T or None for the plain merge)."""
    out = []
    for s, (weak, strong) in enumerate(sets):
        for method in spec.methods:
            temps = [None, spec.temperature] + ([t for t in spec.sweep if t != spec.temperature] if method == "mean" else [])
            for T in temps:
                u = {"set": s, "method": method, "T": T, "weak": weak, "strong": strong}
                out.append((json.dumps(u, sort_keys=True), u))
    return out


def run_weighted(run_dir: Path, spec: WeightedSpec, console: Console | None = None,
                 overrides: dict | None = None) -> None:
    """Run the experiment on a task-level run (resumable); `overrides` change how it runs (backend, workers)."""
    from mergeability.backends import pool_for
    from mergeability.estimate import merge_set_job
    from mergeability.merging import base_accuracy_weights
    from mergeability.pipelines import _progress, open_run_dir
    from mergeability.pipelines.tasks import TaskEvaluator, kept_tasks, prepare_tasks
    from mergeability.updates import load_update

    spec.check()
    console = console or Console()
    run_dir = Path(run_dir)
    cfg, store = open_run_dir(run_dir)
    if not isinstance(cfg, TaskConfig):
        store.close()
        raise MergeabilityError(f"{run_dir} is an example-level run: the weighted experiment needs a task-level run "
                                "(mergeability run tasks)")
    cfg = cfg.replace(**(overrides or {}))
    rows = {r["name"]: r for r in store.rows("SELECT name, path, base_acc FROM tasks")}
    names = [n for n in kept_tasks(store, cfg.threshold) if n in rows]
    sets = task_sets({n: rows[n]["base_acc"] for n in names}, spec, cfg.seed)
    prep = prepare_tasks(cfg)
    updates = {n: load_update(run_dir / rows[n]["path"]) for n in {n for w, s in sets for n in w + s}}
    done = store.experiment_rows(NAME)
    every = units(spec, sets)
    todo = [(key, u) for key, u in every if key not in done]
    payloads = []
    for _, u in todo:
        members = u["weak"] + u["strong"]
        w = None if u["T"] is None else base_accuracy_weights([rows[n]["base_acc"] for n in members], u["T"])
        payloads.append((u["method"], {}, members, w, False))
    evaluate = TaskEvaluator.build(cfg, prep.lm.model, prep.lm.tokenizer, prep.tasks)
    with _progress(console) as progress, pool_for(cfg, TaskEvaluator(cfg), evaluate, updates) as workers:
        bar = progress.add_task(NAME, total=len(every), completed=len(every) - len(todo))
        for i, res in workers.map(merge_set_job, payloads):
            _, _, members, w, _ = payloads[i]
            store.add_experiment(NAME, todo[i][0], {"acc": {n: r[0] for n, r in zip(members, res)}, "weights": w})
            progress.advance(bar)
    store.set_meta("weighted_spec", {k: list(v) if isinstance(v, tuple) else v for k, v in spec.__dict__.items()})
    store.close()


@dataclass
class Retention:
    method: str
    T: float
    weak: list[float] = field(default_factory=list)  # per (set, weak task): weighted − plain retained accuracy
    strong: list[float] = field(default_factory=list)


def retention_changes(rows: dict[str, dict], tasks: dict[str, dict]) -> list[Retention]:
    """Per (method, T): the change in retained accuracy, weighted minus plain, of every weak and strong task."""
    plain, weighted = {}, {}
    for key, res in rows.items():
        u = json.loads(key)
        (plain if u["T"] is None else weighted)[(u["set"], u["method"], u["T"])] = (u, res["acc"])
    out: dict[tuple[str, float], Retention] = {}
    for (s, method, T), (u, acc) in sorted(weighted.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if (s, method, None) not in plain:
            continue
        base = plain[(s, method, None)][1]
        r = out.setdefault((method, T), Retention(method, T))
        for group in ("weak", "strong"):
            for n in u[group]:
                ft = tasks[n]["ft_acc"] or math.nan
                getattr(r, group).append((acc[n] - base[n]) / ft)
    return list(out.values())


def collect_weighted(store, figdir: Path) -> dict:
    """Tables, the Fig. 7 figure of the first set, and the claim verdict from the experiment's rows."""
    from mergeability.analysis.claims import Verdict
    from mergeability.analysis.stats import bootstrap_ci
    from mergeability.report.build import Table
    from mergeability.report.figures import grouped_bars_figure, lines_figure

    rows = store.experiment_rows(NAME)
    out = {"tables": [], "figures": [], "claims": {}}
    if not rows:
        return out
    tasks = {r["name"]: r for r in store.rows("SELECT name, base_acc, ft_acc FROM tasks")}
    spec = store.get_meta("weighted_spec") or {}
    T0 = spec.get("temperature")
    # Fig. 7: the first set, mean merge, plain vs weighted at the main T
    first = {(u["method"], u["T"]): (u, r["acc"]) for u, r in ((json.loads(k), r) for k, r in rows.items()) if u["set"] == 0}
    if ("mean", None) in first and ("mean", T0) in first:
        u, plain = first[("mean", None)]
        weighted = first[("mean", T0)][1]
        members = u["weak"] + u["strong"]
        labels = [f"{n} ({'weak' if n in u['weak'] else 'strong'})" for n in members]
        series = {"base": [tasks[n]["base_acc"] for n in members], "fine-tuned": [tasks[n]["ft_acc"] for n in members],
                  "averaged": [plain[n] for n in members], f"weighted (T={T0:g})": [weighted[n] for n in members]}
        title = "Weighted vs plain averaging, task set 0 (§6, Fig. 7)"
        out["figures"].append((title, grouped_bars_figure(labels, series, figdir / "weighted_set0.png", title, "accuracy")))
        out["tables"].append(Table(title, ["task", *series], [[lab, *(f"{v[i]:.2f}" for v in series.values())]
                                                             for i, lab in enumerate(labels)]))
    changes = retention_changes(rows, tasks)
    table = []
    for r in changes:
        w, s = np.array(r.weak), np.array(r.strong)
        cw, cs = bootstrap_ci(w), bootstrap_ci(s)
        table.append([r.method, f"{r.T:g}", f"{w.mean():+.3f} [{cw[0]:+.3f}, {cw[1]:+.3f}]",
                      f"{s.mean():+.3f} [{cs[0]:+.3f}, {cs[1]:+.3f}]", str(len(w) // max(spec.get("low", 1), 1))])
    out["tables"].append(Table("Change in retained accuracy, weighted − plain merge (mean [95% CI] over task sets)",
                               ["method", "T", "weak tasks", "strong tasks", "sets"], table))
    mean_sweep = sorted((r for r in changes if r.method == "mean"), key=lambda r: r.T)
    if len(mean_sweep) > 1:
        title = "Retained-accuracy change against T, mean merge (§6)"
        series = {"weak tasks": ([r.T for r in mean_sweep], [float(np.mean(r.weak)) for r in mean_sweep]),
                  "strong tasks": ([r.T for r in mean_sweep], [float(np.mean(r.strong)) for r in mean_sweep])}
        out["figures"].append((title, lines_figure(series, figdir / "weighted_sweep.png", title, "temperature T",
                                                   "weighted − plain retained accuracy")))
    main = next((r for r in changes if r.method == "mean" and r.T == T0), None)
    if main is not None and len(main.weak) >= 2:
        cw, cs = bootstrap_ci(main.weak), bootstrap_ci(main.strong)
        measured = f"weak {np.mean(main.weak):+.3f}, strong {np.mean(main.strong):+.3f} (mean merge, T={T0:g})"
        evidence = f"95% CI weak [{cw[0]:+.3f}, {cw[1]:+.3f}], strong [{cs[0]:+.3f}, {cs[1]:+.3f}]"
        if cw[0] > 0 and np.mean(main.strong) > -0.1:
            verdict = "supported"
        elif cw[1] < 0:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        out["claims"]["weighted"] = Verdict("Base-accuracy weighting raises weak tasks' retained accuracy with little "
                                            "loss on strong tasks (§6, Fig. 7)", measured, evidence, verdict)
    return out
