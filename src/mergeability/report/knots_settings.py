"""The knots-settings experiment's section: the score distribution and the features' correlations with the score
under each KnOTS setting (density, λ) whose trials are complete. Tables and a figure only: verdicts are the
claims' (they can reuse `setting_scores`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mergeability import run
from mergeability.analysis.claims import correlate
from mergeability.analysis.features import FEATURES
from mergeability.experiments.knots_settings import KnotsSettings, is_own_setting, setting_label, settings_key
from mergeability.report.document import Sections, Table, fmt
from mergeability.report.figures import lines_figure

CORRELATED = ("gap", "gold_prob", "gold_rank", "prob_gain")  # the features correlated with each setting's score


def setting_scores(cfg, store, ids, experiment: KnotsSettings | None = None) -> dict[str, dict[str, float]]:
    """Label ("d=0.2, λ=1.0") -> scores of `ids`, for every setting of the experiment's grid whose trials are
    complete for every one of `ids`, in grid order. The run's own setting reads the run's own trials."""
    M, N = cfg.merge.trials, cfg.merge.partners
    out = {}
    for d, lam in (experiment or KnotsSettings()).grid():
        key = run.run_key(cfg) if is_own_setting(cfg.merge, d, lam) else settings_key(d, lam, N)
        sc = run.scores(store, key, ids, M, complete=True)
        if set(ids) <= set(sc):
            out[setting_label(d, lam)] = sc
    return out


def own_label(cfg, experiment: KnotsSettings | None = None) -> str | None:
    """The label of the grid's setting that the run's own trials already are, if any."""
    grid = (experiment or KnotsSettings()).grid()
    return next((setting_label(d, lam) for d, lam in grid if is_own_setting(cfg.merge, d, lam)), None)


def distribution_table(settings: dict[str, dict[str, float]], ids: list[str], M: int) -> Table:
    """Counts of updates per score k/M under each setting, then the mean score and the shares at 0 and 1."""
    arrays = {label: np.array([s[i] for i in ids], dtype=float) for label, s in settings.items()}
    rows = [[f"{k / M:.2f}"] + [str(int((np.rint(a * M) == k).sum())) for a in arrays.values()] for k in range(M + 1)]
    rows.append(["mean score"] + [f"{a.mean():.3f}" for a in arrays.values()])
    rows.append(["share at 0"] + [f"{(a == 0).mean():.0%}" for a in arrays.values()])
    rows.append(["share at 1.0"] + [f"{(a == 1).mean():.0%}" for a in arrays.values()])
    return Table("Score distribution by KnOTS setting", ["score", *settings], rows)


def correlation_table(settings: dict[str, dict[str, float]], data: dict, seed: int) -> Table:
    """Per setting and feature: the pooled Spearman ρ and the within-relation (stratified) ρ, each with its p."""
    rows = []
    for label, s in settings.items():
        y = np.array([s[i] for i in data["id"]], dtype=float)
        for f in CORRELATED:
            c = correlate(f, data[f], y, data["relation"], seed=seed)
            rows.append([label, FEATURES[f][0], fmt(c.pooled.rho), fmt(c.pooled.p, 2), fmt(c.within.rho),
                         fmt(c.within.p, 2), str(c.pooled.n)])
    return Table("Correlations with the score under each KnOTS setting",
                 ["setting", "feature", "ρ", "p", "ρ within relation", "p within relation", "n"], rows)


def knots_settings_section(cfg, store, main: dict[str, float], data: dict, figdir: Path) -> Sections:
    """The knots-settings experiment's tables and figure; empty until a setting besides the run's own is
    complete. `main`: the run's own scores by update id; `data`: `load_features(store, main)`."""
    out, M = Sections(), cfg.merge.trials
    ids = sorted(main)
    settings = setting_scores(cfg, store, ids)
    own = own_label(cfg)
    if own is not None:
        settings[own] = main  # the run's own trials are that setting's (setting_scores keeps grid order)
    if not set(settings) - {own}:
        return out
    out.tables.append(distribution_table(settings, ids, M))
    xs = [k / M for k in range(M + 1)]
    series = {label: (xs, [float(np.mean([round(s[i] * M) == k for i in ids])) for k in range(M + 1)])
              for label, s in settings.items()}
    out.figures.append(("Score distribution by KnOTS setting", lines_figure(
        series, Path(figdir) / "knots_settings.png", "Score distribution by KnOTS setting (density d, λ)",
        "mergeability score", "share of updates")))
    out.tables.append(correlation_table(settings, data, cfg.seed))
    return out
