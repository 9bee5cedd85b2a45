"""`mergeability compare RUN_DIR RUN_DIR …`: example-level runs side by side, as the paper's appendix A.2 sets
Llama against Qwen. One column per run (model, dataset, counts, base accuracy, leaking updates where the run
audited them, mean score, trials), the score histograms on shared bins in one figure, and each run's Spearman
correlations and claim verdicts in adjacent columns. Written as compare.html (self-contained) and compare.md in
an output directory; the runs themselves are only read."""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeability import run
from mergeability.analysis.claims import RULES, Verdict, decide, example_level_claims
from mergeability.analysis.features import FEATURES, load_features
from mergeability.analysis.stats import Correlation, assign_bins, bin_centres, binomial_baseline, spearman
from mergeability.analysis.summary import example_summary
from mergeability.atomic import write_text
from mergeability.errors import MergeabilityError
from mergeability.report.document import Table, _html_table, _md_table, fmt
from mergeability.report.experiments import experiment_sections
from mergeability.report.figures import grouped_bars_figure

N_BINS = 5  # shared equal-width bins when the runs' M differ


@dataclass(frozen=True)
class RunView:
    """What the comparison needs of one run, read once."""

    label: str
    model: str
    cfg: object
    summary: dict
    scores: dict[str, float]
    corr: dict[str, Correlation]
    claims: list[Verdict]
    leakage: dict | None  # the run's leakage audit ({"leaking": n, "audited": m}); None where it has none


def read_run(run_dir: Path, label: str) -> RunView:
    """One example-level run's numbers, computed as its own report computes them."""
    cfg, store = run.open_run(run_dir, lock=False)  # a run may be compared while it is live
    try:
        if cfg.kind != "examples":
            raise MergeabilityError(f"{run_dir} is a {cfg.kind} run: compare takes example-level runs (run popqa)")
        sc = run.example_scores(cfg, store)
        if len(sc) < 3:
            raise MergeabilityError(f"{run_dir} has scores for {len(sc)} updates: finish the run first (--resume)")
        data = load_features(store, sc)
        corr = {f: spearman(data[f], data["score"], seed=cfg.seed) for f in FEATURES}
        with tempfile.TemporaryDirectory() as figdir:  # the experiments' figures belong to the run's own report
            found = experiment_sections(cfg, store, sc, Path(figdir), data).claims
        claims = decide(example_level_claims(data, binomial_baseline(data["score"], cfg.merge.trials), found,
                                             seed=cfg.seed))
        summary = example_summary(cfg, store, list(sc))
        model = (store.get_meta("provenance") or {}).get("model") or cfg.model.name
        leakage = store.get_meta("leakage")
    finally:
        store.close()
    return RunView(label, model, cfg, summary, sc, corr, claims, leakage)


def labels_for(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its path where two names are the same."""
    names = [Path(d).name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def shared_histogram(views: Sequence[RunView]) -> tuple[list[str], list[list[int]]]:
    """Bin labels and each run's counts: scores k/M when every run has the same M, else N_BINS equal bins."""
    ms = {v.cfg.merge.trials for v in views}
    M = ms.pop() if len(ms) == 1 else None
    centres = bin_centres([], M, N_BINS)
    labels = ([f"{c:.2f}" for c in centres] if M else
              [f"[{k / N_BINS:.1f}, {(k + 1) / N_BINS:.1f}{']' if k == N_BINS - 1 else ')'}" for k in range(N_BINS)])
    counts = [np.bincount(assign_bins(list(v.scores.values()), M, N_BINS), minlength=len(centres)).tolist()
              for v in views]
    return labels, counts


def overview_table(views: Sequence[RunView]) -> Table:
    def row(label, value):
        return [label] + [value(v, v.summary) for v in views]

    def leak(v, _):
        return f"{v.leakage['leaking']} of {v.leakage['audited']}" if v.leakage else "—"

    rows = [row("model", lambda v, s: v.model), row("dataset", lambda v, s: str(v.cfg.data.dataset)),
            row("merge", lambda v, s: f"{v.cfg.merge.method}, M = {v.cfg.merge.trials}, N = {v.cfg.merge.partners}"),
            row("items screened", lambda v, s: str(s["screened"])),
            row("base accuracy", lambda v, s: f"{s['base_accuracy']:.1%}"),
            row("trained (base-wrong)", lambda v, s: str(s["trained"])),
            row("kept (flipped to correct)", lambda v, s: f"{s['kept']} ({s['kept'] / max(s['trained'], 1):.0%})"),
            row("leaking updates", leak), row("scored updates", lambda v, s: str(s["scored"])),
            row("mean mergeability score", lambda v, s: f"{s['mean_score']:.3f}"),
            row("trials recorded", lambda v, s: str(s["trials"]))]
    return Table("Runs side by side (A.2)", ["", *(v.label for v in views)], rows)


def histogram_table(views: Sequence[RunView], labels: list[str], counts: list[list[int]]) -> Table:
    rows = [[b] + [f"{c[k]} ({c[k] / max(sum(c), 1):.0%})" for c in counts] for k, b in enumerate(labels)]
    return Table("Score histogram on shared bins: updates (share)", ["score", *(v.label for v in views)], rows)


def correlations_table(views: Sequence[RunView]) -> Table:
    def cell(c: Correlation) -> str:
        return f"{fmt(c.rho)} [{fmt(c.ci[0])}, {fmt(c.ci[1])}], p = {fmt(c.p, 2)}, n = {c.n}"

    return Table("Spearman ρ of each feature with the score [95% CI]", ["feature", *(v.label for v in views)],
                 [[label] + [cell(v.corr[f]) for v in views] for f, (label, _) in FEATURES.items()])


def claims_table(views: Sequence[RunView]) -> Table:
    """Claims by row (every example-level run checks the same list, in the same order), verdicts by run."""
    rows = [[c.claim] + [f"{v.claims[i].verdict}: {v.claims[i].measured}" for v in views]
            for i, c in enumerate(views[0].claims)]
    return Table("Claims, each run checked by the same rules", ["claim (paper)", *(v.label for v in views)], rows)


def compare_runs(run_dirs: Sequence[Path], out: Path) -> tuple[Path, list[Table]]:
    """Write compare.html, compare.md and figures/scores.png into `out`; return the HTML path and the tables."""
    if len(run_dirs) < 2:
        raise MergeabilityError("compare needs two or more run directories: mergeability compare RUN_A RUN_B")
    views = [read_run(Path(d), label) for d, label in zip(run_dirs, labels_for(run_dirs))]
    (out / "figures").mkdir(parents=True, exist_ok=True)
    labels, counts = shared_histogram(views)
    shares = {f"{v.label} (n = {sum(c)})": [x / max(sum(c), 1) for x in c] for v, c in zip(views, counts)}
    title = "Mergeability scores of each run, shared bins (A.2)"
    figure = grouped_bars_figure(labels, shares, out / "figures" / "scores.png", title, "share of scored updates")
    tables = [overview_table(views), histogram_table(views, labels, counts), correlations_table(views),
              claims_table(views)]
    write_text(out / "compare.md", _markdown(views, tables, title, figure.relative_to(out)))
    write_text(out / "compare.html", _html(views, tables, title, figure))
    return out / "compare.html", tables


def _heading(views: Sequence[RunView]) -> str:
    return "Mergeability runs side by side: " + " vs ".join(v.label for v in views)


def _markdown(views, tables: list[Table], title: str, figure: Path) -> str:
    parts = [f"# {_heading(views)}\n", _md_table(tables[0].columns, tables[0].rows), f"![{title}]({figure})\n",
             f"{RULES}\n"]
    parts += [f"## {t.title}\n\n" + _md_table(t.columns, t.rows) for t in tables[1:]]
    return "\n".join(parts)


def _html(views, tables: list[Table], title: str, figure: Path) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "font-size:13px;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}")
    b64 = base64.b64encode(figure.read_bytes()).decode()
    head = html.escape(_heading(views))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{head}</title><style>{css}</style></head>"
            f"<body><h1>{head}</h1>{_html_table(tables[0])}<figure><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{b64}'><figcaption>{html.escape(title)}</figcaption></figure>"
            f"<p>{html.escape(RULES)}</p>" + "".join(_html_table(t) for t in tables[1:]) + "</body></html>")
