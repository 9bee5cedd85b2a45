"""The report of an example-level run: the score distribution against the binomial baseline (Fig. 2), each
cause feature per score bin (Fig. 3, Tables A.1/A.2), correlations, the experiments' sections, the claims."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mergeability import run
from mergeability.analysis.claims import correlate, decide, example_level_claims
from mergeability.analysis.features import FEATURES, load_features
from mergeability.analysis.stats import binomial_baseline, per_bin
from mergeability.analysis.summary import example_summary, example_summary_rows
from mergeability.errors import MergeabilityError
from mergeability.merging import get_method
from mergeability.report.document import Sections, Table, correlation_table, fmt, write_report
from mergeability.report.experiments import experiment_sections
from mergeability.report.figures import baseline_figure, bins_figure
from mergeability.report.knots_settings import knots_settings_section
from mergeability.report.predict import predict_section

GROUPS = {  # figure name -> (title, features)
    "knowledge": ("Base-model knowledge by mergeability score (§4.1, Fig. 3)",
                  ["gap", "gold_prob", "gold_rank", "post_margin", "prob_gain"]),
    "difficulty": ("Training-data difficulty by mergeability score (§4.2)", ["passage_ppl", "passage_tokens"]),
    "weights": ("Weight properties and popularity by mergeability score (§4.3)", ["fro_norm", "top_sv", "s_pop"]),
}


def feature_sections(cfg, data: dict, figdir: Path) -> Sections:
    """Per-bin means with CIs of each group of features: a figure and a table per group."""
    out, M = Sections(), cfg.merge.trials
    for name, (title, feats) in GROUPS.items():
        panels = [(FEATURES[f][0], per_bin(data[f], data["score"], M, seed=cfg.seed)) for f in feats]
        out.figures.append((title, bins_figure(panels, figdir / f"{name}.png", title)))
        centres = [b.centre for b in panels[0][1]]
        rows = [["count"] + [str(b.count) for b in panels[0][1]]]
        rows += [[label] + [f"{fmt(b.mean)} [{fmt(b.ci[0])}, {fmt(b.ci[1])}]" for b in bins] for label, bins in panels]
        out.tables.append(Table(f"{title}: mean [95% CI] per score bin", ["feature"] + [f"{c:.2f}" for c in centres],
                                rows))
    return out


def baseline_table(base, M: int) -> Table:
    return Table("Binomial baseline (Fig. 2)", ["score", "observed", "expected"],
                 [[f"{k / M:.2f}", str(o), f"{e:.1f}"] for k, (o, e) in enumerate(zip(base.observed, base.expected))]
                 + [["dispersion", fmt(base.dispersion), f"p = {fmt(base.dispersion_p, 2)}"],
                    ["χ² GOF", "", f"p = {fmt(base.chi2_p, 2)}"]])


def method_settings(cfg) -> list[list[str]]:
    """The merge method and every parameter it ran with, defaults filled in (KnOTS's density and λ set the level
    and shape of every score)."""
    m = cfg.merge
    resolved = dataclasses.asdict(get_method(m.method, **m.params))
    return [["method", m.method], *[[f"  {k}", str(v)] for k, v in resolved.items()]]


def build_example_report(run_dir: Path, cfg, store):
    """The report of an example-level run whose config and (unlocked) store are open; closes the store."""
    sc = run.example_scores(cfg, store)
    if len(sc) < 3:
        raise MergeabilityError(f"{run_dir} has scores for {len(sc)} updates: finish the run first (--resume)")
    data = load_features(store, sc)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    M, N = cfg.merge.trials, cfg.merge.partners
    base = binomial_baseline(data["score"], M)
    corr = {f: correlate(f, data[f], data["score"], data["relation"], seed=cfg.seed) for f in FEATURES}
    out = Sections(figures=[("Score distribution against the binomial baseline (Fig. 2)",
                             baseline_figure(base, figdir / "baseline.png", f"Mergeability scores, M={M}, N={N}"))])
    out.extend(feature_sections(cfg, data, figdir))
    out.tables += [correlation_table({f: label for f, (label, _) in FEATURES.items()}, corr), baseline_table(base, M)]
    out.extend(experiment_sections(cfg, store, sc, figdir, data))  # whatever experiments have rows in the store
    out.extend(knots_settings_section(cfg, store, sc, data, figdir))
    out.extend(predict_section(run_dir, figdir))
    claims = decide(example_level_claims(data, base, out.claims, seed=cfg.seed))
    summary = example_summary_rows(example_summary(cfg, store, list(sc)))
    provenance = store.get_meta("provenance") or {}
    settings = [*method_settings(cfg), ["M (trials)", str(M)], ["N (partners)", str(N)],
                ["dataset", cfg.data.dataset], ["questions per subject", str(cfg.data.per_subject)]]
    return write_report(run_dir, provenance, settings, summary, out, claims), claims
