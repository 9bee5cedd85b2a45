import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from mergeability.analysis.claims import Directional, NoEffect, decide, pooled_only
from mergeability.analysis.stats import binomial_baseline, bootstrap_ci, per_bin, spearman
from mergeability.config import from_flat, save_config
from mergeability.estimate import params_key
from mergeability.report.build import build_report
from mergeability.store import Store

M = 5


def synthetic_run(path, n=80, seed=0):
    """A run whose scores are over-dispersed and whose 'gap' falls, 'prob_gain' rises, the rest is noise."""
    rng = np.random.default_rng(seed)
    cfg = from_flat("examples", trials=M, partners=3, items=n)
    path.mkdir()
    save_config(cfg, path / "config.yaml")
    store = Store(path / "results.sqlite")
    store.set_meta("provenance", {"model": "synthetic", "seed": seed})
    key = params_key(cfg.merge.method, {**cfg.merge.params, "partners": cfg.merge.partners})
    p = rng.beta(0.5, 0.5, n)  # per-update success probability: far from one pooled p
    for i in range(n):
        k = rng.binomial(M, p[i])
        score = k / M
        store.add_item(dict(id=f"u{i}", relation="r", subj="s", question="q", obj="o",
                            s_pop=float(rng.integers(1, 10**6)),
                            options=["o"] * 8, gold=0, correct=0, scores=[0.0] * 8,
                            gold_prob=0.1 + 0.5 * score + 0.05 * rng.random(),
                            gold_rank=int(rng.integers(1, 8)), gap=0.9 - 0.7 * score + 0.05 * rng.random()))
        store.add_update(dict(item_id=f"u{i}", path=f"updates/u{i}", kept=1, train_loss=0.5,
                              passage_ppl=float(rng.lognormal(2, 0.3)), passage_tokens=int(rng.integers(40, 120)),
                              post_scores=[1.0] + [0.0] * 7,
                              post_gold_prob=0.2 + 0.5 * score + 0.5 * score + 0.05 * rng.random(),
                              post_gap=0.0, fro_norm=float(rng.normal(30, 2)), top_sv=float(rng.normal(25, 2))))
        for t in range(M):
            store.add_trial(dict(target=f"u{i}", trial=t, method=cfg.merge.method, params=key, partners=["x"],
                                 correct=int(t < k), probs=[1.0]))
    store.close()
    return path


def test_known_structure_gives_expected_verdicts(tmp_path):
    run = synthetic_run(tmp_path / "run")
    html_path, claims = build_report(run)
    by = lambda prefix: next(c for c in claims if c.claim.startswith(prefix))  # noqa: E731
    assert by("Mergeability differs from the binomial baseline").verdict == "supported"
    gap = by("The base model's probability gap")
    assert gap.verdict == "supported" and float(gap.measured.split("=")[1].split("(")[0]) < -0.8
    assert by("The post-training improvement").verdict == "supported"
    assert by("Mergeability is local").verdict == "inconclusive"
    assert (run / "report.md").exists() and (run / "figures" / "baseline.png").stat().st_size > 1000


def test_noise_feature_is_inconclusive_and_correlated_one_is_strong():
    rng = np.random.default_rng(1)
    score = rng.integers(0, M + 1, 100) / M
    strong = spearman(score + 0.05 * rng.random(100), score)
    s = pooled_only("x", strong)
    assert strong.rho > 0.8 and decide([Directional("x", s, +1)])[0].verdict == "supported"
    assert decide([Directional("x", s, -1)])[0].verdict == "contradicted"
    noise = spearman(rng.random(100), score)
    assert decide([Directional("x", pooled_only("x", noise), +1)])[0].verdict == "inconclusive"
    assert decide([NoEffect("x", (s,))])[0].verdict == "contradicted"


def test_baseline_rejects_overdispersion_not_binomial():
    rng = np.random.default_rng(0)
    over = np.r_[np.zeros(50), np.ones(50)]
    assert binomial_baseline(over, M).dispersion_p < 0.001
    binom = rng.binomial(M, 0.6, 200) / M
    b = binomial_baseline(binom, M)
    assert b.dispersion_p > 0.05 and b.chi2_p > 0.05
    assert sum(b.observed) == 200 and abs(sum(b.expected) - 200) < 1e-6


def test_bootstrap_is_deterministic_under_seed():
    v = np.random.default_rng(0).random(50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)
    rows = per_bin(v, np.linspace(0, 1, 50), M, seed=2)
    assert [r.centre for r in rows] == [k / M for k in range(M + 1)] and sum(r.count for r in rows) == 50


class _Parser(HTMLParser):
    """Images, every header cell, and each table as (header cells, body rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.imgs, self.headers, self.tables, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append(([], []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("th", "td"):
            self._cell = tag
            if tag == "td":
                self.tables[-1][1][-1].append("")

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._cell = None

    def handle_data(self, data):
        if self._cell == "th":
            self.headers.append(data)
            self.tables[-1][0].append(data)
        elif self._cell == "td":
            self.tables[-1][1][-1][-1] += data


def md_claims(md: str) -> dict[str, str]:
    """claim -> verdict, from the claims table of report.md (the table under '## Claims')."""
    section = md.split("## Claims", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    assert cells and cells[0] == ["claim (paper)", "measured", "CI / p-value", "verdict"], cells[:1]
    return {row[0]: row[-1].strip("*") for row in cells[2:]}  # past the header and the |---| line


GAP = "The base model's probability gap"  # falls with the score by construction: supported
LOCAL = "Mergeability is local"  # needs an experiment the synthetic run has not got: inconclusive


def test_report_html_is_self_contained(tmp_path):
    run = synthetic_run(tmp_path / "run")
    html_path, _ = build_report(run)
    p = _Parser()
    p.feed(html_path.read_text())
    assert len(p.imgs) == 4
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for col in ("claim (paper)", "measured", "CI / p-value", "verdict", "ρ pooled", "ρ within relation",
                "95% CI (within)", "observed", "expected"):
        assert col in p.headers
    # the claims table renders each claim's own verdict: the synthetic data fix two of them
    [rows] = [rows for cols, rows in p.tables if cols == ["claim (paper)", "measured", "CI / p-value", "verdict"]]
    verdicts = {r[0]: r[-1] for r in rows if r}
    assert next(v for c, v in verdicts.items() if c.startswith(GAP)) == "supported", verdicts
    assert next(v for c, v in verdicts.items() if c.startswith(LOCAL)) == "inconclusive", verdicts
    md = md_claims((run / "report.md").read_text())
    assert next(v for c, v in md.items() if c.startswith(GAP)) == "supported", md
    assert next(v for c, v in md.items() if c.startswith(LOCAL)) == "inconclusive", md
    assert md == verdicts  # the same claims and verdicts in both renderings


def test_report_of_a_non_run_is_an_error(tmp_path):
    from mergeability import MergeabilityError

    with pytest.raises(MergeabilityError, match="not a run directory"):
        build_report(tmp_path)
