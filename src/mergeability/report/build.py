"""`mergeability report RUN_DIR`: provenance, summary, tables, figures and the claims table, as HTML and Markdown."""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mergeability.analysis.claims import RULES, Verdict, example_level_claims
from mergeability.analysis.features import FEATURES, load_features
from mergeability.analysis.stats import binomial_baseline, per_bin, spearman
from mergeability.errors import MergeabilityError
from mergeability.report.figures import baseline_figure, bins_figure

GROUPS = {  # figure name -> (title, features)
    "knowledge": ("Base-model knowledge by mergeability score (§4.1, Fig. 3)",
                  ["gap", "gold_prob", "gold_rank", "post_margin", "prob_gain"]),
    "difficulty": ("Training-data difficulty by mergeability score (§4.2)", ["passage_ppl", "passage_tokens"]),
    "weights": ("Weight properties and popularity by mergeability score (§4.3)", ["fro_norm", "top_sv", "s_pop"]),
}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


def _f(x: float, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}g}"


def run_scores(run_dir: Path, cfg, store) -> dict[str, float]:
    from mergeability.pipelines import run_key, scores

    key = run_key(cfg)
    kept = [r["item_id"] for r in store.rows("SELECT item_id FROM updates WHERE kept = 1")]
    sc = scores(store, key, kept, cfg.trials)
    if len(sc) < 3:
        raise MergeabilityError(f"{run_dir} has scores for {len(sc)} updates: finish the run first (--resume)")
    return sc


def build_report(run_dir: Path) -> tuple[Path, list[Verdict]]:
    """Write figures/, report.html and report.md into the run directory; return the HTML path and the claims."""

    from mergeability.config import TaskConfig
    from mergeability.pipelines import open_run_dir

    run_dir = Path(run_dir)
    cfg, store = open_run_dir(run_dir, lock=False)  # a report may be drawn while a run is live
    if isinstance(cfg, TaskConfig):
        from mergeability.report.tasks import build_task_report

        return build_task_report(run_dir, cfg, store)
    try:
        sc = run_scores(run_dir, cfg, store)
    except MergeabilityError:
        store.close()
        raise
    data = load_features(store, sc)
    figdir = run_dir / "figures"
    figdir.mkdir(exist_ok=True)
    M = cfg.trials
    base = binomial_baseline(data["score"], M)
    corr = {f: spearman(data[f], data["score"], seed=cfg.seed) for f in FEATURES}
    figures = [("Score distribution against the binomial baseline (Fig. 2)",
                baseline_figure(base, figdir / "baseline.png", f"Mergeability scores, M={M}, N={cfg.partners}"))]
    tables = []
    for name, (title, feats) in GROUPS.items():
        panels = [(FEATURES[f][0], per_bin(data[f], data["score"], M, seed=cfg.seed)) for f in feats]
        figures.append((title, bins_figure(panels, figdir / f"{name}.png", title)))
        centres = [b.centre for b in panels[0][1]]
        rows = [["count"] + [str(b.count) for b in panels[0][1]]]
        for label, bins in panels:
            rows.append([label] + [f"{_f(b.mean)} [{_f(b.ci[0])}, {_f(b.ci[1])}]" for b in bins])
        tables.append(Table(f"{title}: mean [95% CI] per score bin", ["feature"] + [f"{c:.2f}" for c in centres], rows))
    tables.append(Table("Spearman correlation of each feature with the score", ["feature", "ρ", "95% CI", "p", "n"],
                        [[FEATURES[f][0], _f(c.rho), f"[{_f(c.ci[0])}, {_f(c.ci[1])}]", _f(c.p, 2), str(c.n)]
                         for f, c in corr.items()]))
    tables.append(Table("Binomial baseline (Fig. 2)", ["score", "observed", "expected"],
                        [[f"{k / M:.2f}", str(o), f"{e:.1f}"] for k, (o, e) in enumerate(zip(base.observed, base.expected))]
                        + [["dispersion", _f(base.dispersion), f"p = {_f(base.dispersion_p, 2)}"],
                           ["χ² GOF", "", f"p = {_f(base.chi2_p, 2)}"]]))
    from mergeability.experiments import collect

    exp = collect(cfg, store, sc, figdir)  # whatever experiments have rows in the store
    claims = example_level_claims(corr, base, exp["claims"])
    tables = tables + exp["tables"]
    figures = figures + exp["figures"]
    summary = _summary(store, cfg, sc)
    provenance = store.get_meta("provenance") or {}
    store.close()
    settings = [["method", cfg.method], ["method parameters", str(cfg.method_params)], ["M (trials)", str(cfg.trials)],
                ["N (partners)", str(cfg.partners)], ["dataset", cfg.dataset]]
    html_path = write_html(run_dir, provenance, settings, summary, tables, figures, claims)
    write_md(run_dir, provenance, settings, summary, tables, figures, claims)
    return html_path, claims


def _summary(store, cfg, sc: dict) -> list[list[str]]:
    from mergeability.pipelines import run_key, summarize

    s = summarize(store, cfg, run_key(cfg), list(sc))
    n_trials = store.rows("SELECT COUNT(*) AS n FROM trials")[0]["n"]
    return [["items screened", str(s["screened"])],
            ["base accuracy", f"{s['base_accuracy']:.1%}"],
            ["trained (base-wrong)", str(s["trained"])],
            ["kept (flipped to correct)", f"{s['kept']} ({s['kept'] / max(s['trained'], 1):.0%})"],
            ["scored updates", str(len(sc))],
            ["trials recorded", str(n_trials)],
            ["mean mergeability score", f"{s['mean_score']:.3f}"]]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(run_dir, prov, settings, summary, tables, figures, claims) -> Path:
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}.supported{color:#1a7f37}"
           ".contradicted{color:#b42318}.inconclusive{color:#8a6d00}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mergeability report: {html.escape(run_dir.name)}"
             f"</title><style>{css}</style></head><body><h1>Mergeability report: {html.escape(run_dir.name)}</h1>"]
    parts.append(_html_table(Table("Provenance", ["key", "value"], [[k, str(v)] for k, v in prov.items()] + settings)))
    parts.append(_html_table(Table("Summary", ["", "value"], summary)))
    parts.append("<h2>Claims</h2><p>" + html.escape(RULES) + "</p>")
    parts.append("<table><thead><tr><th>claim (paper)</th><th>measured</th><th>CI / p-value</th><th>verdict</th>"
                 "</tr></thead><tbody>")
    for c in claims:
        parts.append(f"<tr><td>{html.escape(c.claim)}</td><td>{html.escape(c.measured)}</td>"
                     f"<td>{html.escape(c.evidence)}</td><td class='{c.verdict}'>{c.verdict}</td></tr>")
    parts.append("</tbody></table><h2>Figures</h2>")
    for title, path in figures:
        b64 = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("<h2>Tables</h2>" + "".join(_html_table(t) for t in tables) + "</body></html>")
    path = run_dir / "report.html"
    _atomic_write(path, "".join(parts))
    return path


def _md_table(columns, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(map(esc, columns)) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]) + "\n"


def write_md(run_dir, prov, settings, summary, tables, figures, claims) -> Path:
    parts = [f"# Mergeability report: {run_dir.name}\n", "## Provenance\n",
             _md_table(["key", "value"], [[k, v] for k, v in prov.items()] + settings),
             "## Summary\n", _md_table(["", "value"], summary), "## Claims\n", RULES + "\n\n",
             _md_table(["claim (paper)", "measured", "CI / p-value", "verdict"],
                       [[c.claim, c.measured, c.evidence, f"**{c.verdict}**"] for c in claims]),
             "## Figures\n"]
    parts += [f"![{t}]({Path(p).relative_to(run_dir)})\n" for t, p in figures]
    parts.append("## Tables\n")
    parts += [f"### {t.title}\n\n" + _md_table(t.columns, t.rows) for t in tables]
    path = run_dir / "report.md"
    _atomic_write(path, "\n".join(parts))
    return path
