"""The report's section for the weighted experiment (§6, Fig. 7), in the order a reader must check it: the task
selection, the two precondition gates, then the change in retained accuracy per method and T (sign-flip p over
sets, CIs clustered by task), the T sweep, the first set as Fig. 7, and the claim. The rule is `claims.RULES`'s
(constants `ROOM`, `LITTLE`); a failed gate or a selection too small for one set makes the claim "not testable"."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeability.analysis.claims import ALPHA, LITTLE, ROOM, Verdict
from mergeability.analysis.experiments import group_gap, plain_losses, retention_changes, set_means, sign_flip_p
from mergeability.analysis.inference import cluster_bootstrap_ci
from mergeability.experiments.weighted import SCALE_NAME, Weighted, members, scale_units, too_few, units
from mergeability.report.document import Sections, Table, fmt
from mergeability.report.figures import grouped_bars_figure, lines_figure

NAME = "weighted"
CLAIM = "Base-accuracy weighting raises weak tasks' retained accuracy with little loss on strong tasks (§6, Fig. 7)"
RULE_OF = {  # how each row's weights enter its merge, as the report states it
    "mean": "weighted mean Σ w_i ΔW_i / Σ w",
    "agreeing": "disjoint mean ÷ the agreeing updates' weights (weights cancel where updates do not overlap)",
    "all": "disjoint mean with weights normalised over all updates (each update × n·w_i/Σw)",
}


@dataclass(frozen=True)
class Plan:
    """What the experiment recorded before merging: its parameters, every task's selection, the sets."""

    spec: Weighted
    threshold: float
    selection: dict[str, dict]
    sets: list

    @classmethod
    def of(cls, meta: dict) -> Plan:
        spec = Weighted(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
        return cls(spec, meta["threshold"], meta["selection"], meta["sets"])

    def weak(self) -> list[str]:
        return members(self.selection, "weak")

    def strong(self) -> list[str]:
        return members(self.selection, "strong")

    def rule(self, method: str) -> str:
        return RULE_OF["mean"] if method not in ("ties", "knots") else f"{method}: {RULE_OF[self.spec.ties_weighting]}"


@dataclass(frozen=True)
class Gate:
    passed: bool
    text: str  # what was measured against what


# ------------------------------------------------------------------ selection and gates


def selection_table(plan: Plan) -> Table:
    s = plan.spec
    title = (f"§6 task selection: weak = base ≤ {s.weak_max:g}; strong = base ≥ {s.strong_min:g} and ≥ majority-class "
             f"rate + {s.majority_margin:g}; both fine-tuned ≥ {plan.threshold:g} and gaining ≥ {s.min_gain:g} "
             f"over base (or half the base's errors, if less)")
    rows = [[n, fmt(r["base"]), fmt(r["ft"]), fmt(r["majority"]), r["group"] or "—", r["why"]]
            for n, r in plan.selection.items()]
    return Table(title, ["task", "base acc", "fine-tuned acc", "majority rate", "group", "why"], rows)


def scale_curves(store, plan: Plan, tasks: dict) -> dict[str, dict[float, float]]:
    """Task -> {scale: accuracy of its adapter alone}, 1.0 being the fine-tuned accuracy."""
    rows = store.experiment_rows(SCALE_NAME)
    curves: dict[str, dict[float, float]] = {}
    for key, u in scale_units(plan.spec, sorted({n for w, s in plan.sets for n in w + s})):
        if key in rows:
            curves.setdefault(u["task"], {1.0: tasks[u["task"]]["ft_acc"]})[u["s"]] = rows[key]["acc"][u["task"]]
    return curves


def room_gate(curves: dict, plan: Plan, tasks: dict) -> tuple[Gate, dict[str, float]]:
    """Gate (a): can weights give the weak tasks back anything? Per weak task used, the retained accuracy of its
    adapter alone at the most weights give it (1/low) minus at its share in a plain merge (1/(low + high))."""
    plain, most = plan.spec.shares()
    room = {n: (c[most] - c[plain]) / (tasks[n]["ft_acc"] or math.nan) for n, c in curves.items() if n in plan.weak()}
    mean = float(np.mean(list(room.values()))) if room else math.nan
    text = (f"(a) weak adapters alone, retained accuracy at scale {most:.3g} − at {plain:.3g}: mean {mean:+.2f} over "
            f"{len(room)} tasks (needs ≥ {ROOM})")
    return Gate(bool(mean >= ROOM), text), room


def curve_section(curves: dict, room: dict, plan: Plan, figdir: Path) -> Sections:
    out = Sections()
    if not curves:
        return out
    xs = sorted({s for c in curves.values() for s in c})
    group = {n: plan.selection[n]["group"] for n in curves}
    title = "Gate (a): accuracy of each adapter alone against its scale s (task arithmetic, λ = s)"
    out.figures.append((title, lines_figure({f"{n} ({group[n]})": (xs, [c[s] for s in xs]) for n, c in curves.items()},
                                            figdir / "weighted_scales.png", title, "scale s", "accuracy")))
    out.tables.append(Table(title, ["task", "group", *(f"s = {s:.3g}" for s in xs), "room (weak)"],
                            [[n, group[n], *(fmt(c[s]) for s in xs), fmt(room.get(n))] for n, c in curves.items()]))
    return out


def loss_gate(rows: dict, tasks: dict, seed: int) -> tuple[Gate, Table]:
    """Gate (b): plain merging must cost weak tasks more retained accuracy than strong ones (CI above 0)."""
    table, gate = [], None
    for method in sorted({json.loads(k)["method"] for k in rows}):
        loss = plain_losses(rows, tasks, method)
        gap, ci = group_gap(loss.values, loss.weak, loss.tasks, seed=seed)
        weak = [v for v, w in zip(loss.values, loss.weak) if w]
        strong = [v for v, w in zip(loss.values, loss.weak) if not w]
        table.append([method, fmt(np.mean(weak)), fmt(np.mean(strong)), f"{gap:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"])
        if method == "mean":
            gate = Gate(bool(ci[0] > 0), f"(b) plain mean merge, weak − strong loss of retained accuracy {gap:+.3f}, "
                                         f"95% CI clustered by task [{ci[0]:+.3f}, {ci[1]:+.3f}] (needs > 0)")
    title = "Gate (b): what the plain merge costs (1 − merged / fine-tuned accuracy), weak vs strong tasks"
    return gate, Table(title, ["method", "weak loss", "strong loss", "weak − strong [95% CI by task]"], table)


# ------------------------------------------------------------------ results and the claim


@dataclass(frozen=True)
class WeightingClaim:
    """§6 with its gates passed: the weak tasks' per-set change by a sign-flip test (Holm-adjusted with the table),
    the strong tasks' change by its CI clustered by task against −LITTLE."""

    gates: str
    T: float
    sets: int
    weak: float
    weak_ci: tuple[float, float]
    p: float  # sign-flip permutation p of the weak tasks' per-set change
    strong: float
    strong_ci: tuple[float, float]

    def pvalues(self) -> list[float]:
        return [self.p]

    def decide(self, adjusted) -> Verdict:
        p = adjusted[0]
        if p < ALPHA and self.weak > 0 and self.strong_ci[0] > -LITTLE:
            verdict = "supported"
        elif (p < ALPHA and self.weak < 0) or self.strong_ci[1] < -LITTLE:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        measured = (f"weak {self.weak:+.3f}, strong {self.strong:+.3f} retained accuracy, weighted − plain "
                    f"(mean merge, T = {self.T:g}, {self.sets} sets)")
        evidence = (f"gates passed: {self.gates}; weak: sign-flip p = {self.p:.2g} (Holm {p:.2g}) over sets, 95% CI "
                    f"clustered by task [{self.weak_ci[0]:+.3f}, {self.weak_ci[1]:+.3f}]; strong: 95% CI clustered by "
                    f"task [{self.strong_ci[0]:+.3f}, {self.strong_ci[1]:+.3f}] (little loss: above −{LITTLE})")
        return Verdict(CLAIM, measured, evidence, verdict)


def change_stats(r, seed: int) -> dict:
    """A (method, T) row's numbers: per-group mean, CI clustered by task, and the weak tasks' sign-flip p."""
    return {"weak": float(np.mean(r.weak)), "weak_ci": cluster_bootstrap_ci(r.weak, r.weak_tasks, seed=seed),
            "p": sign_flip_p(set_means(r.weak, r.weak_sets), seed=seed), "strong": float(np.mean(r.strong)),
            "strong_ci": cluster_bootstrap_ci(r.strong, r.strong_tasks, seed=seed), "sets": len(set(r.weak_sets))}


def results_section(changes: list, plan: Plan, seed: int, figdir: Path) -> tuple[Sections, dict]:
    out, stats = Sections(), {(r.method, r.T): change_stats(r, seed) for r in changes}
    out.tables.append(Table(
        "Change in retained accuracy, weighted − plain merge (mean [95% CI clustered by task]; p: sign flips of the "
        "weak tasks' per-set change, before Holm)", ["method", "weighting rule", "T", "weak tasks", "p (weak)",
                                                     "strong tasks", "sets"],
        [[m, plan.rule(m), f"{T:g}", f"{s['weak']:+.3f} [{s['weak_ci'][0]:+.3f}, {s['weak_ci'][1]:+.3f}]",
          f"{s['p']:.2g}", f"{s['strong']:+.3f} [{s['strong_ci'][0]:+.3f}, {s['strong_ci'][1]:+.3f}]", str(s["sets"])]
         for (m, T), s in stats.items()]))
    sweep = sorted((k for k in stats if k[0] == "mean"), key=lambda k: k[1])
    if len(sweep) > 1:
        title = "Retained-accuracy change against T, mean merge (§6)"
        series = {g: ([T for _, T in sweep], [stats[k][g] for k in sweep]) for g in ("weak", "strong")}
        out.figures.append((title, lines_figure({f"{g} tasks": v for g, v in series.items()},
                                                figdir / "weighted_sweep.png", title, "temperature T",
                                                "weighted − plain retained accuracy")))
    return out, stats


def first_set_section(rows: dict, tasks: dict, T0, figdir: Path) -> Sections:
    """Fig. 7: set 0 under the mean merge, plain and weighted at the main T."""
    out = Sections()
    first = {(u["method"], u["T"]): (u, r["acc"]) for u, r in ((json.loads(k), r) for k, r in rows.items())
             if u["set"] == 0}
    if ("mean", None) not in first or ("mean", T0) not in first:
        return out
    u, plain = first[("mean", None)]
    weighted = first[("mean", T0)][1]
    names = u["weak"] + u["strong"]
    labels = [f"{n} ({'weak' if n in u['weak'] else 'strong'})" for n in names]
    series = {"base": [tasks[n]["base_acc"] for n in names], "fine-tuned": [tasks[n]["ft_acc"] for n in names],
              "averaged": [plain[n] for n in names], f"weighted (T={T0:g})": [weighted[n] for n in names]}
    title = "Weighted vs plain averaging, task set 0 (§6, Fig. 7)"
    out.figures.append((title, grouped_bars_figure(labels, series, figdir / "weighted_set0.png", title, "accuracy")))
    out.tables.append(Table(title, ["task", *series],
                            [[lab, *(f"{v[i]:.2f}" for v in series.values())] for i, lab in enumerate(labels)]))
    return out


def not_testable(why: str) -> Verdict:
    return Verdict(CLAIM, "—", f"not testable here: {why}", "not testable")


def weighted_section(store, figdir: Path, seed: int = 0) -> Sections:
    """Selection, gates, tables and figures from the experiment's plan and rows; the claim (undecided when it can
    be tested: `decide` Holm-adjusts it with the rest of the table)."""
    meta, out = store.get_meta("weighted_plan"), Sections()
    if meta is None:
        if store.experiment_rows(NAME):
            out.claims[NAME] = Verdict(CLAIM, "—", "rows of an earlier version with no recorded plan: rerun "
                                       "`mergeability experiment weighted`", "inconclusive")
        return out
    plan = Plan.of(meta)
    out.tables.append(selection_table(plan))
    if not plan.sets:
        out.claims[NAME] = not_testable(too_few(plan.weak(), plan.strong(), plan.spec))
        return out
    tasks = {r["name"]: r for r in store.task_rows()}
    keys = {k for k, _ in units(plan.spec, plan.sets)}
    rows = {k: r for k, r in store.experiment_rows(NAME).items() if k in keys}
    scale_keys = {k for k, _ in scale_units(plan.spec, sorted({n for w, s in plan.sets for n in w + s}))}
    scaled = scale_keys & set(store.experiment_rows(SCALE_NAME))
    if len(rows) < len(keys) or len(scaled) < len(scale_keys):
        out.claims[NAME] = Verdict(CLAIM, "—", f"unfinished: {len(rows)} of {len(keys)} merges and {len(scaled)} of "
                                   f"{len(scale_keys)} scaled adapters recorded: resume `mergeability experiment "
                                   "weighted`", "inconclusive")
        return out
    curves = scale_curves(store, plan, tasks)
    return out.extend(decided_sections(plan, rows, tasks, curves, seed, figdir))


def decided_sections(plan: Plan, rows: dict, tasks: dict, curves: dict, seed: int, figdir: Path) -> Sections:
    """Everything after the selection of a finished experiment: gates first, then results and the claim."""
    out = Sections()
    room, per_task = room_gate(curves, plan, tasks)
    out.extend(curve_section(curves, per_task, plan, figdir))
    loss, loss_table = loss_gate(rows, tasks, seed)
    out.tables.append(loss_table)
    results, stats = results_section(retention_changes(rows, tasks), plan, seed, figdir)
    out.extend(results).extend(first_set_section(rows, tasks, plan.spec.temperature, figdir))
    main = stats.get(("mean", plan.spec.temperature))
    if loss is None or main is None:
        out.claims[NAME] = not_testable("the verdict is decided on the mean merge: add mean to --methods")
    elif not (room.passed and loss.passed):
        out.claims[NAME] = not_testable("; ".join(f"gate {g.text}: {'passed' if g.passed else 'FAILED'}"
                                                  for g in (room, loss)))
    else:
        out.claims[NAME] = WeightingClaim(f"{room.text}; {loss.text}", plan.spec.temperature, main["sets"],
                                          main["weak"], main["weak_ci"], main["p"], main["strong"], main["strong_ci"])
    return out
