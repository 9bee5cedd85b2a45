"""The report of a task-level run: base accuracy and the other causes by score bin (Fig. 4, A.5, A.6, Table 1),
degradation against base accuracy (A.15), the threshold sweep (A.16-A.19), the weighted experiment (§6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mergeability import run
from mergeability.analysis.claims import (
    ALPHA,
    AllOf,
    Corr,
    Directional,
    NoEffect,
    Verdict,
    correlate,
    decide,
    not_run,
    pooled_only,
)
from mergeability.analysis.stats import per_bin, spearman
from mergeability.analysis.summary import task_summary, task_summary_rows
from mergeability.errors import MergeabilityError
from mergeability.pipelines.tasks import PPL_SAMPLE
from mergeability.report.document import Sections, Table, correlation_table, fmt, write_report
from mergeability.report.figures import bins_figure, lines_figure, scatter_figure
from mergeability.report.predict import predict_section
from mergeability.report.weighted import weighted_section

FEATURES = {  # column of the tasks table -> label
    "base_acc": "base accuracy",
    "answer_ppl": "answer log-perplexity (base model, training answers)",
    "train_tokens": "context length (training tokens per example)",
    "fro_norm": "‖ΔW‖_F",
    "top_sv": "σ_max(ΔW)",
}
# What each feature is, in words: the report prints these beside the per-bin figure and table, so that a reader
# compares like with like against the paper's appendix.
DEFINITIONS = {
    "base_acc": "exact-match accuracy of the base model on the task's test items (greedy generation)",
    "answer_ppl": ("A.5: the base model's perplexity of the answers of the task's training examples given their "
                   "prompts, exp(mean NLL over answer tokens): each example's first reference and the EOS that "
                   "ends it; prompt tokens are context, not scored. Over the whole train split for an adapter trained "
                   f"by the run; over its first {PPL_SAMPLE} examples for an adapter the pool brings. Shown as its "
                   "log."),
    "train_tokens": ("A.6: the training context length: mean tokens of a training sequence as the adapter was "
                     "trained on it (prompt + answer + EOS, the base model's tokenizer), over the task's train "
                     "split. Not the test prompt (scores.csv keeps that as prompt_tokens)."),
    "fro_norm": "Frobenius norm of the adapter's ΔW, summed in quadrature over its modules",
    "top_sv": "largest singular value of the adapter's ΔW over its modules",
}
N_BINS = 5  # scores are accuracies, so bins are equal-width: [0, .2), [.2, .4), …, [.8, 1]


def _arrays(store, sc: dict[str, float]) -> dict[str, np.ndarray]:
    rows = [r for r in store.task_rows() if r["name"] in sc]
    out = {"name": np.array([r["name"] for r in rows]), "score": np.array([sc[r["name"]] for r in rows], dtype=float)}
    for col in [*FEATURES, "ft_acc"]:  # a store written before a column existed has none (train_tokens): missing
        out[col] = np.array([np.nan if r.get(col) is None else r[col] for r in rows], dtype=float)
    out["answer_ppl"] = np.log(out["answer_ppl"])  # letters reach ppl 8,000, numbers 2: means need the log
    out["degradation"] = out["ft_acc"] - out["score"]
    return out


def feature_sections(cfg, d: dict, corr: dict, degr, figdir: Path) -> Sections:
    """Causes per score bin (Fig. 4, A.5, A.6, Table 1), correlations, degradation (A.15), the per-task table."""
    out = Sections()
    panels = [(label, per_bin(d[f], d["score"], None, seed=cfg.seed, n_bins=N_BINS)) for f, label in FEATURES.items()]
    title = ("Causes by mergeability score: base accuracy (Fig. 4), base-model perplexity of the training answers "
             "(A.5), training context length in tokens (A.6), weights (Table 1)")
    fig = bins_figure(panels, figdir / "task_bins.png", "Task-level causes by mergeability score")
    out.figures.append((title, fig))
    rows = [["tasks"] + [str(b.count) for b in panels[0][1]]]
    rows += [[label] + [f"{fmt(b.mean)} [{fmt(b.ci[0])}, {fmt(b.ci[1])}]" for b in bins] for label, bins in panels]
    out.tables.append(Table("Features per score bin, mean [95% CI] (Table 1 for the weight rows)",
                            ["feature"] + bin_labels(panels[0][1]), rows))
    out.tables.append(definitions_table(d))
    out.tables.append(correlation_table(FEATURES, corr))
    title = "Degradation after merging against base accuracy (A.15)"
    out.figures.append((title, scatter_figure(d["base_acc"], d["degradation"], figdir / "degradation.png", title,
                                              "base-model accuracy", "fine-tuned accuracy − mergeability score",
                                              [n.split("_", 1)[-1] for n in d["name"]])))
    out.tables.append(Table("Per task", ["task", "base acc", "fine-tuned acc", "score", "degradation"],
                            [[n, f"{b:.2f}", f"{f:.2f}", f"{s:.2f}", f"{g:+.2f}"] for n, b, f, s, g in
                             zip(d["name"], d["base_acc"], d["ft_acc"], d["score"], d["degradation"])]))
    return out


def definitions_table(d: dict) -> Table:
    """What each feature of the tables above measures; a feature this run did not record says so."""
    rows = [[FEATURES[f], text if not np.isnan(d[f]).all() else
             f"{text} — not recorded by this run (written before it was): rerun the tasks into a new --out"]
            for f, text in DEFINITIONS.items()]
    return Table("What each feature measures (A.5 perplexity, A.6 context length)", ["feature", "definition"], rows)


def bin_labels(bins) -> list[str]:
    return [f"{b.centre - 0.1:.1f}–{b.centre + 0.1:.1f}" for b in bins]


def threshold_section(cfg, store, figdir: Path) -> tuple[Sections, dict]:
    """A.16-A.19: base accuracy per score bin at each threshold whose pool has its own trials."""
    out, rows, corrs, series, seen = Sections(), [], {}, {}, set()
    for th in sorted({cfg.data.threshold, *cfg.data.sweep}, reverse=True):
        pool = store.tasks_reaching(th)
        if tuple(pool) in seen:  # the same tasks as a stricter threshold: the same trials
            continue
        seen.add(tuple(pool))
        s = run.task_scores(cfg, store, pool)
        if len(s) < 3:
            continue
        a = _arrays(store, s)
        bins = per_bin(a["base_acc"], a["score"], None, seed=cfg.seed, n_bins=N_BINS)
        corrs[th] = spearman(a["base_acc"], a["score"], seed=cfg.seed)
        rows.append([f"≥ {th:g}", str(len(s))] + [fmt(b.mean) for b in bins] + [fmt(corrs[th].rho)])
        series[f"fine-tuned acc ≥ {th:g} ({len(s)} tasks)"] = ([b.centre for b in bins], [b.mean for b in bins])
        labels = bin_labels(bins)
    if rows:
        out.tables.append(Table("Base accuracy per score bin at each fine-tuned-accuracy threshold (A.16-A.19)",
                                ["threshold", "tasks"] + labels + ["ρ(base acc, score)"], rows))
        title = "Base accuracy by score bin across thresholds (A.16-A.19)"
        out.figures.append((title, lines_figure(series, figdir / "thresholds.png", title, "mergeability score",
                                                "mean base accuracy")))
    return out, corrs


def task_claims(d: dict, corr: dict, degr, sweep_corr: dict, experiment_claims: dict) -> list[Verdict]:
    """The claims table of a task-level run, decided (Holm across it). Tasks have no relation to stratify by."""
    def c(f: str) -> Corr:
        return pooled_only(f, corr[f])

    lowest = (d["score"] < 1 / N_BINS).astype(float)  # Table 1's lowest bin against all others

    return decide([
        Directional("Tasks the base model knows better are more mergeable (Fig. 4)", c("base_acc"), +1),
        Directional("Degradation after merging falls as base accuracy rises (A.15)", pooled_only("degr", degr), -1),
        Directional("Lower perplexity of the task data goes with higher scores (A.5)", c("answer_ppl"), -1),
        Directional("Longer training contexts go with higher scores (A.6)", c("train_tokens"), +1),
        NoEffect("Weight norm and top singular value do not correlate with the score (Table 1)",
                 (c("fro_norm"), c("top_sv"))),
        AllOf("The lowest score bin has higher ‖ΔW‖ and σ_max than the rest (Table 1)",
              (Directional("‖ΔW‖", correlate("‖ΔW‖ vs lowest bin", d["fro_norm"], lowest), +1),
               Directional("σ_max", correlate("σ_max vs lowest bin", d["top_sv"], lowest), +1))),
        _thresholds_claim(sweep_corr),
        experiment_claims.get("weighted") or not_run("Base-accuracy weighting raises weak tasks' retained accuracy "
                                                     "with little loss on strong tasks (§6, Fig. 7)", "weighted"),
    ])


def build_task_report(run_dir: Path, cfg, store):
    """The report of a task-level run whose config and (unlocked) store are open."""
    pools = run.task_pools(store)
    if cfg.data.threshold not in pools:
        raise MergeabilityError(f"{run_dir} has no trials yet: finish the run first (--resume)")
    sc = run.task_scores(cfg, store, pools[cfg.data.threshold])
    if len(sc) < 3:
        raise MergeabilityError(f"{run_dir} has scores for {len(sc)} tasks: finish the run first (--resume)")
    d = _arrays(store, sc)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    corr = {f: spearman(d[f], d["score"], seed=cfg.seed) for f in FEATURES}
    degr = spearman(d["base_acc"], d["degradation"], seed=cfg.seed)
    out = feature_sections(cfg, d, corr, degr, figdir)
    sweep, sweep_corr = threshold_section(cfg, store, figdir)
    out.extend(sweep).extend(weighted_section(store, figdir, seed=cfg.seed)).extend(predict_section(run_dir, figdir))
    claims = task_claims(d, corr, degr, sweep_corr, out.claims)
    summary = task_summary_rows(task_summary(cfg, store, pools[cfg.data.threshold]))
    m = cfg.merge
    settings = [["method", m.method], ["method parameters", str(m.params)], ["M (trials)", str(m.trials)],
                ["N (partners)", str(m.partners)], ["threshold", str(cfg.data.threshold)],
                ["answer normalisation", "case, whitespace, punctuation at either end"]]
    return write_report(run_dir, store.get_meta("provenance") or {}, settings, summary, out, claims), claims


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

