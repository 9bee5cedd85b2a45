"""The report of a task-level run: base accuracy and the other causes by score bin (Fig. 4, A.5, A.6, Table 1),
degradation against base accuracy (A.15), the threshold sweep (A.16-A.19), the weighted experiment (§6)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mergeability.analysis.claims import ALPHA, Verdict, directional, no_correlation, not_run
from mergeability.analysis.stats import per_bin, spearman
from mergeability.errors import MergeabilityError

FEATURES = {  # column of the tasks table -> label
    "base_acc": "base accuracy",
    "answer_ppl": "answer log-perplexity (base model)",
    "prompt_tokens": "context length (prompt tokens)",
    "fro_norm": "‖ΔW‖_F",
    "top_sv": "σ_max(ΔW)",
}
N_BINS = 5  # scores are accuracies, so bins are equal-width: [0, .2), [.2, .4), …, [.8, 1]


def _f(x, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}g}"


def _arrays(store, sc: dict[str, float]) -> dict[str, np.ndarray]:
    rows = [r for r in store.rows("SELECT * FROM tasks ORDER BY name") if r["name"] in sc]
    out = {"name": np.array([r["name"] for r in rows]), "score": np.array([sc[r["name"]] for r in rows], dtype=float)}
    for col in [*FEATURES, "ft_acc"]:
        out[col] = np.array([np.nan if r[col] is None else r[col] for r in rows], dtype=float)
    out["answer_ppl"] = np.log(out["answer_ppl"])  # letters reach ppl 8,000, numbers 2: means need the log
    out["degradation"] = out["ft_acc"] - out["score"]
    return out


def build_task_report(run_dir: Path, cfg, store):
    """The report of a task-level run whose config and (unlocked) store are open; closes the store."""
    from mergeability.pipelines.tasks import kept_tasks, summarize_tasks, task_scores
    from mergeability.report.build import Table, write_html, write_md
    from mergeability.report.figures import bins_figure, lines_figure, scatter_figure
    from mergeability.weighted import collect_weighted

    pools = {float(k): v for k, v in (store.get_meta("pools") or {}).items()}
    if cfg.threshold not in pools:
        store.close()
        raise MergeabilityError(f"{run_dir} has no trials yet: finish the run first (--resume)")
    sc = task_scores(store, cfg, pools[cfg.threshold])
    if len(sc) < 3:
        store.close()
        raise MergeabilityError(f"{run_dir} has scores for {len(sc)} tasks: finish the run first (--resume)")
    d = _arrays(store, sc)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    corr = {f: spearman(d[f], d["score"], seed=cfg.seed) for f in FEATURES}
    figures, tables = [], []

    panels = [(label, per_bin(d[f], d["score"], None, seed=cfg.seed, n_bins=N_BINS)) for f, label in FEATURES.items()]
    title = "Causes by mergeability score: base accuracy (Fig. 4), perplexity (A.5), context (A.6), weights (Table 1)"
    figures.append((title, bins_figure(panels, figdir / "task_bins.png", "Task-level causes by mergeability score")))
    centres = [f"{b.centre - 0.1:.1f}–{b.centre + 0.1:.1f}" for b in panels[0][1]]
    rows = [["tasks"] + [str(b.count) for b in panels[0][1]]]
    rows += [[label] + [f"{_f(b.mean)} [{_f(b.ci[0])}, {_f(b.ci[1])}]" for b in bins] for label, bins in panels]
    tables.append(Table("Features per score bin, mean [95% CI] (Table 1 for the weight rows)", ["feature"] + centres, rows))
    tables.append(Table("Spearman correlation of each feature with the score", ["feature", "ρ", "95% CI", "p", "n"],
                        [[FEATURES[f], _f(c.rho), f"[{_f(c.ci[0])}, {_f(c.ci[1])}]", _f(c.p, 2), str(c.n)]
                         for f, c in corr.items()]))
    degr = spearman(d["base_acc"], d["degradation"], seed=cfg.seed)
    title = "Degradation after merging against base accuracy (A.15)"
    figures.append((title, scatter_figure(d["base_acc"], d["degradation"], figdir / "degradation.png", title,
                                          "base-model accuracy", "fine-tuned accuracy − mergeability score",
                                          [n.split("_", 1)[-1] for n in d["name"]])))
    tables.append(Table("Per task", ["task", "base acc", "fine-tuned acc", "score", "degradation"],
                        [[n, f"{b:.2f}", f"{f:.2f}", f"{s:.2f}", f"{g:+.2f}"] for n, b, f, s, g in
                         zip(d["name"], d["base_acc"], d["ft_acc"], d["score"], d["degradation"])]))

    # threshold sweep: each threshold's pool has its own trials (partners are drawn from that pool)
    sweep_rows, sweep_corr, series, seen = [], {}, {}, set()
    for th in sorted({cfg.threshold, *cfg.sweep}, reverse=True):
        pool = kept_tasks(store, th)
        if tuple(pool) in seen:  # the same tasks as a stricter threshold: the same trials
            continue
        seen.add(tuple(pool))
        s = task_scores(store, cfg, pool)
        if len(s) < 3:
            continue
        a = _arrays(store, s)
        bins = per_bin(a["base_acc"], a["score"], None, seed=cfg.seed, n_bins=N_BINS)
        sweep_corr[th] = spearman(a["base_acc"], a["score"], seed=cfg.seed)
        sweep_rows.append([f"≥ {th:g}", str(len(s))] + [_f(b.mean) for b in bins] + [_f(sweep_corr[th].rho)])
        series[f"fine-tuned acc ≥ {th:g} ({len(s)} tasks)"] = ([b.centre for b in bins], [b.mean for b in bins])
    if sweep_rows:
        tables.append(Table("Base accuracy per score bin at each fine-tuned-accuracy threshold (A.16-A.19)",
                            ["threshold", "tasks"] + centres + ["ρ(base acc, score)"], sweep_rows))
        title = "Base accuracy by score bin across thresholds (A.16-A.19)"
        figures.append((title, lines_figure(series, figdir / "thresholds.png", title, "mergeability score",
                                            "mean base accuracy")))
    weighted = collect_weighted(store, figdir)
    tables += weighted["tables"]
    figures += weighted["figures"]

    claims = [
        directional("Tasks the base model knows better are more mergeable (Fig. 4)", corr["base_acc"], +1),
        directional("Degradation after merging falls as base accuracy rises (A.15)", degr, -1),
        directional("Lower perplexity of the task data goes with higher scores (A.5)", corr["answer_ppl"], -1),
        directional("Longer contexts go with higher scores (A.6)", corr["prompt_tokens"], +1),
        no_correlation("Weight norm and top singular value do not correlate with the score (Table 1)",
                       [corr["fro_norm"], corr["top_sv"]]),
        _thresholds_claim(sweep_corr),
        weighted["claims"].get("weighted") or not_run("Base-accuracy weighting raises weak tasks' retained accuracy "
                                                      "with little loss on strong tasks (§6, Fig. 7)", "weighted"),
    ]
    s = summarize_tasks(store, cfg, pools[cfg.threshold])
    n_trials = store.rows("SELECT COUNT(*) AS n FROM trials")[0]["n"]
    summary = [["tasks", str(s["tasks"])], [f"kept (fine-tuned accuracy ≥ {cfg.threshold:g})", str(s["kept"])],
               ["scored tasks", str(len(sc))], ["trials recorded", str(n_trials)],
               ["mean mergeability score", f"{s['mean_score']:.3f}"]]
    provenance = store.get_meta("provenance") or {}
    store.close()
    settings = [["method", cfg.method], ["method parameters", str(cfg.method_params)], ["M (trials)", str(cfg.trials)],
                ["N (partners)", str(cfg.partners)], ["threshold", str(cfg.threshold)],
                ["answer normalisation", "case, whitespace, punctuation at either end"]]
    html_path = write_html(run_dir, provenance, settings, summary, tables, figures, claims)
    write_md(run_dir, provenance, settings, summary, tables, figures, claims)
    return html_path, claims


def _thresholds_claim(corrs: dict) -> Verdict:
    claim = "Higher scores go with higher base accuracy at every threshold (A.16-A.19)"
    if len(corrs) < 2:
        return Verdict(claim, "—", "fewer than two thresholds have their own pool", "inconclusive")
    measured = "; ".join(f"≥{t:g}: ρ = {c.rho:+.2f}" for t, c in corrs.items())
    evidence = "; ".join(f"p = {c.p:.2g}" for c in corrs.values())
    if all(c.p < ALPHA and c.rho > 0 for c in corrs.values()):
        return Verdict(claim, measured, evidence, "supported")
    if any(c.p < ALPHA and c.rho < 0 for c in corrs.values()):
        return Verdict(claim, measured, evidence, "contradicted")
    return Verdict(claim, measured, evidence, "inconclusive")

