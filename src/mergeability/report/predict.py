"""The report's section of `mergeability predict`: how well the no-merge features predict each update's score under
grouped cross-validation, next to every baseline; importances, calibration and cost. Drawn from predict.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mergeability.prediction import LABELS, read_result
from mergeability.report.document import Sections, Table, fmt
from mergeability.report.figures import calibration_figure

KIND = {"model": "predictor (no merge)", "proxy": "one merge (proxy)", "feature": "single feature"}


def evaluation_table(result: dict) -> Table:
    unit = "relation" if result["level"] == "examples" else "task family"
    rows = [[LABELS.get(e["name"], e["name"]), KIND[e["kind"]], fmt(e["rho"], 2),
             f"[{fmt(e['ci'][0], 2)}, {fmt(e['ci'][1], 2)}]", fmt(e["auc_lost"], 2), fmt(e["auc_survives"], 2)]
            for e in result["evaluations"]]
    th = result["thresholds"]
    return Table(f"Predicting the score, cross-validated by {unit} ({result['n']} updates, {result['groups']} "
                 f"groups): Spearman ρ of out-of-fold predictions (95 % CI, groups resampled), AUC of lost "
                 f"(score ≤ {th['lost']}) and survives (≥ {th['survives']})",
                 ["predictor", "kind", "ρ", "95% CI", "AUC lost", "AUC survives"], rows)


def importance_table(result: dict) -> Table:
    ranked = sorted(result["importances"].items(), key=lambda kv: -kv[1])
    return Table(f"Feature importances of the {result['best']} predictor (drop in ρ when a feature is permuted)",
                 ["feature", "importance"], [[LABELS.get(f, f), fmt(v, 2)] for f, v in ranked])


def cost_table(result: dict) -> Table:
    c = result["costs"]
    share = lambda s: "—" if s is None else f"{100 * s:.1f} %"  # noqa: E731
    return Table("What the features cost, beside the run's trials stage", ["part", "seconds", "share of trials"],
                 [["interference (from factors)", fmt(c["interference"]), "—"],
                  ["hidden-state shift (forward passes)", fmt(c["hidden_shift"]), "—"],
                  ["no-merge features together", fmt(c["interference"] + c["hidden_shift"]),
                   share(c["no_merge_share"])],
                  ["one-merge proxy", fmt(c["proxy"]), share(c["proxy_share"])],
                  ["trials stage of the run", fmt(c["trials"]), "100 %"]])


def predict_section(run_dir: Path, figdir: Path) -> Sections:
    """Tables and the calibration figure when `mergeability predict` has been run; nothing otherwise."""
    result = read_result(run_dir)
    out = Sections()
    if result is None:
        return out
    out.tables += [evaluation_table(result), importance_table(result), cost_table(result)]
    if result.get("dropped"):
        out.tables.append(Table("Features left out (fewer than two distinct values)", ["feature"],
                                [[LABELS.get(f, f)] for f in result["dropped"]]))
    measured = np.array(result.get("scores", []), dtype=float)
    if measured.size:
        out.figures.append((f"Calibration of the {result['best']} predictor (out of fold)", calibration_figure(
            result["calibration"], result["oof"]["best"], measured, figdir / "predict_calibration.png",
            f"{result['best']} predictor, grouped CV")))
    return out
