"""The paper's claims, each checked against a run's numbers by a rule declared here (never hard-coded)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergeability.analysis.stats import BaselineTest, Correlation

ALPHA = 0.05  # significance level
NEGLIGIBLE = 0.3  # |ρ| below this counts as "does not correlate"

RULES = (
    f"Directional claims (a feature rises or falls with the score): supported if Spearman ρ has the claimed sign "
    f"and p < {ALPHA}; contradicted if ρ has the opposite sign and p < {ALPHA}; otherwise inconclusive. "
    f"'No correlation' claims: supported if the 95 % bootstrap CI of ρ lies inside (−{NEGLIGIBLE}, {NEGLIGIBLE}); "
    f"contradicted if p < {ALPHA} and |ρ| ≥ {NEGLIGIBLE}; otherwise inconclusive. "
    f"Baseline claim: supported if the over-dispersion test rejects the binomial baseline at p < {ALPHA}, "
    f"else inconclusive. Claims that need an experiment not yet run are inconclusive."
)


@dataclass(frozen=True)
class Verdict:
    claim: str
    measured: str
    evidence: str  # CI or p-value
    verdict: str  # supported | contradicted | inconclusive


def _fmt(c: Correlation) -> tuple[str, str]:
    return f"ρ = {c.rho:+.2f} (n = {c.n})", f"95% CI [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}], p = {c.p:.2g}"


def directional(claim: str, c: Correlation, sign: int) -> Verdict:
    m, e = _fmt(c)
    if math.isnan(c.rho):
        return Verdict(claim, m, e, "inconclusive")
    if c.p < ALPHA and math.copysign(1, c.rho) == sign:
        return Verdict(claim, m, e, "supported")
    if c.p < ALPHA:
        return Verdict(claim, m, e, "contradicted")
    return Verdict(claim, m, e, "inconclusive")


def no_correlation(claim: str, cs: Sequence[Correlation]) -> Verdict:
    """Supported only if every listed feature's CI is inside the negligible band."""
    m = "; ".join(_fmt(c)[0] for c in cs)
    e = "; ".join(_fmt(c)[1] for c in cs)
    if any(math.isnan(c.rho) for c in cs):
        return Verdict(claim, m, e, "inconclusive")
    if all(-NEGLIGIBLE < c.ci[0] and c.ci[1] < NEGLIGIBLE for c in cs):
        return Verdict(claim, m, e, "supported")
    if any(c.p < ALPHA and abs(c.rho) >= NEGLIGIBLE for c in cs):
        return Verdict(claim, m, e, "contradicted")
    return Verdict(claim, m, e, "inconclusive")


def baseline(claim: str, b: BaselineTest) -> Verdict:
    m = f"dispersion {b.dispersion:.2f} × binomial (p̄ = {b.pooled_p:.2f})"
    e = f"over-dispersion p = {b.dispersion_p:.2g}; χ² GOF p = {b.chi2_p:.2g}"
    ok = not math.isnan(b.dispersion_p) and b.dispersion_p < ALPHA
    return Verdict(claim, m, e, "supported" if ok else "inconclusive")


def all_of(claim: str, measured: str, parts: Sequence[Verdict]) -> Verdict:
    """A claim that holds where each of its parts does: supported if every part is, contradicted if any part
    is, otherwise inconclusive (so is a claim of no parts). The evidence lists the parts'."""
    verdicts = [v.verdict for v in parts]
    verdict = ("supported" if verdicts and all(v == "supported" for v in verdicts)
               else "contradicted" if "contradicted" in verdicts else "inconclusive")
    return Verdict(claim, measured, "; ".join(v.evidence for v in parts), verdict)


def not_run(claim: str, experiment: str) -> Verdict:
    return Verdict(claim, "—", f"run `mergeability experiment {experiment}`", "inconclusive")


def example_level_claims(corr: Mapping[str, Correlation], base: BaselineTest,
                         experiments: Mapping[str, Verdict] | None = None) -> list[Verdict]:
    """The claims table of an example-level run. `corr` maps feature -> correlation with the score."""
    ex = experiments or {}
    return [
        baseline("Mergeability differs from the binomial baseline (Fig. 2)", base),
        directional("The base model's probability gap (top − gold) falls as the score rises (Fig. 3)", corr["gap"], -1),
        directional("The post-training improvement in p(gold) rises with the score (Fig. 3)", corr["prob_gain"], +1),
        no_correlation("Passage perplexity and length are poor predictors of the score (§4.2)",
                       [corr["passage_ppl"], corr["passage_tokens"]]),
        no_correlation("Weight norm and top singular value do not correlate with the score (§4.3)",
                       [corr["fro_norm"], corr["top_sv"]]),
        ex.get("locality") or not_run("Mergeability is local: high-score updates stay stable whatever partners (§5.1)",
                                      "locality"),
        ex.get("weaker_methods") or not_run("Weaker merge methods put more updates at score 1.0 (§5.2)", "algorithms"),
        ex.get("methods_agree") or not_run("Scores agree across merge methods (A.9)", "algorithms"),
        ex.get("mn_agree") or not_run("Scores agree across M and N (A.3)", "robustness"),
    ]
