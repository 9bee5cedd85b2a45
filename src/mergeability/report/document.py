"""What a report is made of (tables, figures, claims) and how it is written: self-contained HTML and Markdown."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from mergeability.analysis.claims import RULES
from mergeability.atomic import write_text


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Sections:
    """Tables, figures (title, PNG path) and claim verdicts (by key) that one part of the analysis adds."""

    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    claims: dict = field(default_factory=dict)  # key -> a claim (analysis.claims), decided with the whole table

    def extend(self, other: Sections) -> Sections:
        self.tables += other.tables
        self.figures += other.figures
        self.claims.update(other.claims)
        return self


def fmt(x, d: int = 3) -> str:
    """A number to `d` significant digits; missing values as a dash."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}g}"


def correlation_table(labels: dict[str, str], corr: dict) -> Table:
    """Spearman ρ of each feature with the score: `corr` maps feature -> `Correlation` (pooled), or -> `Corr`
    (pooled and within relation)."""
    if all(hasattr(c, "within") for c in corr.values()):
        return Table("Spearman correlation of each feature with the score, pooled and within relation",
                     ["feature", "ρ pooled", "p pooled", "ρ within relation", "95% CI (within)", "p (within)", "n"],
                     [[labels[f], fmt(c.pooled.rho), fmt(c.pooled.p, 2), fmt(c.within.rho),
                       f"[{fmt(c.within.ci[0])}, {fmt(c.within.ci[1])}]", fmt(c.within.p, 2), str(c.within.n)]
                      for f, c in corr.items()])
    return Table("Spearman correlation of each feature with the score", ["feature", "ρ", "95% CI", "p", "n"],
                 [[labels[f], fmt(c.rho), f"[{fmt(c.ci[0])}, {fmt(c.ci[1])}]", fmt(c.p, 2), str(c.n)]
                  for f, c in corr.items()])


def write_report(run_dir: Path, prov: dict, settings, summary, sections: Sections, claims) -> Path:
    """report.html and report.md in the run directory; returns the HTML path."""
    html_path = write_html(run_dir, prov, settings, summary, sections.tables, sections.figures, claims)
    write_md(run_dir, prov, settings, summary, sections.tables, sections.figures, claims)
    return html_path


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(run_dir, prov, settings, summary, tables, figures, claims) -> Path:
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}.supported{color:#1a7f37}"
           ".contradicted{color:#b42318}.inconclusive{color:#8a6d00}.not-testable{color:#555}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mergeability report: {html.escape(run_dir.name)}"
             f"</title><style>{css}</style></head><body><h1>Mergeability report: {html.escape(run_dir.name)}</h1>"]
    parts.append(_html_table(Table("Provenance", ["key", "value"], [[k, str(v)] for k, v in prov.items()] + settings)))
    parts.append(_html_table(Table("Summary", ["", "value"], summary)))
    parts.append("<h2>Claims</h2><p>" + html.escape(RULES) + "</p>")
    parts.append("<table><thead><tr><th>claim (paper)</th><th>measured</th><th>CI / p-value</th><th>verdict</th>"
                 "</tr></thead><tbody>")
    for c in claims:
        css = c.verdict.replace(" ", "-")  # "not testable" is one class
        parts.append(f"<tr><td>{html.escape(c.claim)}</td><td>{html.escape(c.measured)}</td>"
                     f"<td>{html.escape(c.evidence)}</td><td class='{css}'>{c.verdict}</td></tr>")
    parts.append("</tbody></table><h2>Figures</h2>")
    for title, path in figures:
        b64 = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("<h2>Tables</h2>" + "".join(_html_table(t) for t in tables) + "</body></html>")
    path = run_dir / "report.html"
    write_text(path, "".join(parts))
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
    write_text(path, "\n".join(parts))
    return path
