"""The report's section for the weighted experiment (§6, Fig. 7): the first set plain vs weighted, the change in
retained accuracy per method and T with CIs, the T sweep, and the claim's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mergeability.analysis.claims import Verdict
from mergeability.analysis.experiments import retention_changes
from mergeability.analysis.inference import cluster_bootstrap_ci
from mergeability.report.document import Sections, Table
from mergeability.report.figures import grouped_bars_figure, lines_figure

NAME = "weighted"


def first_set_section(rows: dict, tasks: dict, T0, figdir: Path) -> Sections:
    """Fig. 7: set 0 under the mean merge, plain and weighted at the main T."""
    out = Sections()
    first = {(u["method"], u["T"]): (u, r["acc"]) for u, r in ((json.loads(k), r) for k, r in rows.items())
             if u["set"] == 0}
    if ("mean", None) not in first or ("mean", T0) not in first:
        return out
    u, plain = first[("mean", None)]
    weighted = first[("mean", T0)][1]
    members = u["weak"] + u["strong"]
    labels = [f"{n} ({'weak' if n in u['weak'] else 'strong'})" for n in members]
    series = {"base": [tasks[n]["base_acc"] for n in members], "fine-tuned": [tasks[n]["ft_acc"] for n in members],
              "averaged": [plain[n] for n in members], f"weighted (T={T0:g})": [weighted[n] for n in members]}
    title = "Weighted vs plain averaging, task set 0 (§6, Fig. 7)"
    out.figures.append((title, grouped_bars_figure(labels, series, figdir / "weighted_set0.png", title, "accuracy")))
    out.tables.append(Table(title, ["task", *series],
                            [[lab, *(f"{v[i]:.2f}" for v in series.values())] for i, lab in enumerate(labels)]))
    return out


def weighted_claim(main) -> Verdict:
    """Decided on CIs clustered by task: the same few tasks recur in every set, so (set, task) pairs are not
    independent units."""
    cw = cluster_bootstrap_ci(main.weak, main.weak_tasks)
    cs = cluster_bootstrap_ci(main.strong, main.strong_tasks)
    measured = f"weak {np.mean(main.weak):+.3f}, strong {np.mean(main.strong):+.3f} (mean merge, T={main.T:g})"
    evidence = f"95% CI clustered by task: weak [{cw[0]:+.3f}, {cw[1]:+.3f}], strong [{cs[0]:+.3f}, {cs[1]:+.3f}]"
    verdict = ("supported" if cw[0] > 0 and np.mean(main.strong) > -0.1 else
               "contradicted" if cw[1] < 0 else "inconclusive")
    return Verdict("Base-accuracy weighting raises weak tasks' retained accuracy with little loss on strong tasks "
                   "(§6, Fig. 7)", measured, evidence, verdict)


def weighted_section(store, figdir: Path) -> Sections:
    """Tables, the Fig. 7 figure of the first set, and the claim verdict from the experiment's rows."""
    rows = store.experiment_rows(NAME)
    if not rows:
        return Sections()
    tasks = {r["name"]: r for r in store.task_rows()}
    spec = store.get_meta("weighted_spec") or {}
    T0 = spec.get("temperature")
    out = first_set_section(rows, tasks, T0, figdir)
    changes = retention_changes(rows, tasks)
    table = []
    for r in changes:
        w, s = np.array(r.weak), np.array(r.strong)
        cw, cs = cluster_bootstrap_ci(w, r.weak_tasks), cluster_bootstrap_ci(s, r.strong_tasks)
        table.append([r.method, f"{r.T:g}", f"{w.mean():+.3f} [{cw[0]:+.3f}, {cw[1]:+.3f}]",
                      f"{s.mean():+.3f} [{cs[0]:+.3f}, {cs[1]:+.3f}]", str(len(w) // max(spec.get("low", 1), 1))])
    out.tables.append(Table("Change in retained accuracy, weighted − plain merge (mean [95% CI clustered by task])",
                            ["method", "T", "weak tasks", "strong tasks", "sets"], table))
    sweep = sorted((r for r in changes if r.method == "mean"), key=lambda r: r.T)
    if len(sweep) > 1:
        title = "Retained-accuracy change against T, mean merge (§6)"
        series = {"weak tasks": ([r.T for r in sweep], [float(np.mean(r.weak)) for r in sweep]),
                  "strong tasks": ([r.T for r in sweep], [float(np.mean(r.strong)) for r in sweep])}
        out.figures.append((title, lines_figure(series, figdir / "weighted_sweep.png", title, "temperature T",
                                                "weighted − plain retained accuracy")))
    main = next((r for r in changes if r.method == "mean" and r.T == T0), None)
    if main is not None and len(main.weak) >= 2:
        out.claims["weighted"] = weighted_claim(main)
    return out
