"""The paper's claims, each decided from a run's numbers by a rule declared here (never hard-coded).

A claim is a frozen dataclass holding its tests; `decide(claims)` adjusts every p-value of one claims table
together (Holm, so ten claims tested on one run do not get ten chances at α) and applies each claim's rule to its
adjusted p-values. Directional claims are decided within relation: relation drives both a fact's base accuracy and
its passage, so a pooled correlation can be produced by relation alone; the pooled ρ is shown beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mergeability.analysis.inference import (
    Stratified,
    Trend,
    equivalent,
    holm,
    spearman_power,
    spearman_power_n,
    stratified_spearman,
)
from mergeability.analysis.stats import BaselineTest, Correlation, spearman

ALPHA = 0.05  # significance level, applied to Holm-adjusted p-values
NEGLIGIBLE = 0.3  # |ρ| below this counts as "does not correlate"
DETECT = 0.2  # an inconclusive correlation states the n that would detect |ρ| = DETECT ...
POWER = 0.8  # ... with this power at ALPHA
MARGIN = 0.2  # locality: a change in accuracy across the partners' whole score range still "stable"
MIN_MERGES = 6  # locality: "stable" needs at least this many merges in each of at least 3 partner bins
ROOM = 0.1  # §6 gate (a): weak adapters alone must, on average, gain this much retained accuracy between the share
# a plain merge gives them and the most that weights can give them: less, and weighting has nothing to recover
LITTLE = 0.1  # §6: "little loss" on strong tasks = a loss of retained accuracy smaller than this

# What a claim can be found to be. "not testable": a precondition of the claim's test fails on this run (a gate,
# or too few tasks of a kind); the evidence says which, and the claim has no p-value in the table's Holm set.
VERDICTS = ("supported", "contradicted", "inconclusive", "not testable")

RULES = (
    f"Every p-value of a claims table is Holm-adjusted across the table; verdicts use the adjusted value at "
    f"α = {ALPHA}. Directional claims (a feature rises or falls with the score) are decided on Spearman ρ within "
    f"relation (the size-weighted mean of within-relation ρ; p from permuting scores within relation): supported if "
    f"ρ has the claimed sign and p < α, contradicted if the opposite sign and p < α, otherwise inconclusive, with "
    f"the n that would detect |ρ| = {DETECT} at {POWER:.0%} power. The pooled ρ is shown beside it. "
    f"'No correlation' claims: supported if each feature's 95 % CI of within-relation ρ lies inside "
    f"(−{NEGLIGIBLE}, {NEGLIGIBLE}); contradicted if some p < α with |ρ| ≥ {NEGLIGIBLE}; otherwise inconclusive. "
    f"Bin claims (the top or bottom score bin differs) are directional claims on the bin's indicator. "
    f"Baseline claim: supported if the over-dispersion test rejects the binomial baseline. "
    f"Paired claims (more updates at score 1.0 under one method): exact sign test on the discordant updates. "
    f"Locality (the merge is the unit: a merge's fixed updates share its partners): supported if the bootstrap 95 % "
    f"CI of the slope of the fixed sets' per-merge accuracy on the partners' score lies inside ±{MARGIN}, with ≥ 3 "
    f"bins of ≥ {MIN_MERGES} merges; contradicted if a permutation test (bins permuted within fixed set) rejects "
    f"equal accuracy across bins and the accuracy spans ≥ {MARGIN}; otherwise inconclusive. A claim of several "
    f"parts is supported if every part is, contradicted if any part is. Claims that need an experiment not yet run "
    f"are inconclusive. Equivalence rules (no correlation, locality) use unadjusted 95 % CIs. "
    f"Base-accuracy weighting (§6) is decided on the mean merge at the main T over many sets of weak and strong "
    f"tasks, after two gates that the report shows first: (a) the weak tasks' adapters alone gain, on average, "
    f"≥ {ROOM} retained accuracy between the scale a plain merge gives them (1/set size) and the most weights give "
    f"them (1/weak tasks per set); (b) plain merging costs weak tasks more retained accuracy than strong ones (95 % "
    f"CI of the difference, resampling tasks, above 0). A failed gate, or too few weak or strong tasks for one set, "
    f"makes it not testable, with the reason. Otherwise: supported if the weak tasks' change (weighted − plain "
    f"retained accuracy, one mean per set) is positive with a sign-flip permutation p < α over sets and the strong "
    f"tasks' 95 % CI clustered by task lies above −{LITTLE}; contradicted if the weak change is negative with "
    f"p < α, or the strong CI lies below −{LITTLE}; otherwise inconclusive."
)


@dataclass(frozen=True)
class Verdict:
    claim: str
    measured: str
    evidence: str  # CI or p-values
    verdict: str  # one of VERDICTS

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:  # a typo would otherwise print as a verdict nobody defined
            raise ValueError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")

    # A decided verdict is a claim with no tests left, so it can stand in a table beside undecided ones.
    def pvalues(self) -> list[float]:
        return []

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        return self


def _p(raw: float, adj: float) -> str:
    return f"p = {raw:.2g} (Holm {adj:.2g})" if not math.isnan(raw) else "p = n/a"


def _signed(p_adj: float, effect: float, sign: int) -> str:
    if math.isnan(p_adj) or math.isnan(effect) or p_adj >= ALPHA:
        return "inconclusive"
    return "supported" if math.copysign(1, effect) == sign else "contradicted"


@dataclass(frozen=True)
class Corr:
    """One feature against the score, pooled and within relation."""

    label: str
    pooled: Correlation
    within: Stratified


def correlate(label: str, x, y, strata=None, *, seed: int = 0) -> Corr:
    """`x` against `y`; `strata` (e.g. each update's relation) for the within-relation test, None for none."""
    return Corr(label, spearman(x, y, seed=seed), stratified_spearman(x, y, strata, seed=seed))


def pooled_only(label: str, c: Correlation) -> Corr:
    """A correlation with no strata to test within (task level): the within test is the pooled one."""
    return Corr(label, c, Stratified(c.rho, c.p, c.ci, c.n, 1))


def power_note(c: Stratified) -> str:
    if c.n < 4:
        return f"n = {c.n}: too few to test"
    need = spearman_power_n(DETECT, ALPHA, POWER)
    return (f"n = {c.n}; ≈{need} needed to detect |ρ| = {DETECT} at {POWER:.0%} power and α = {ALPHA} before Holm "
            f"(power now {spearman_power(DETECT, c.n, ALPHA):.0%})")


@dataclass(frozen=True)
class Directional:
    """The score rises (sign +1) or falls (−1) with a feature."""

    claim: str
    corr: Corr
    sign: int

    def pvalues(self) -> list[float]:
        return [self.corr.within.p]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        w, c = self.corr.within, self.corr.pooled
        verdict = _signed(adjusted[0], w.rho, self.sign)
        measured = f"ρ = {w.rho:+.2f} within relation ({w.strata} rel., n = {w.n}); pooled {c.rho:+.2f}"
        if w.strata <= 1:
            measured = f"ρ = {w.rho:+.2f} (n = {w.n})"
        evidence = f"{_p(w.p, adjusted[0])}, 95% CI [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}]"
        if verdict == "inconclusive":
            evidence += f"; {power_note(w)}"
        return Verdict(self.claim, measured, evidence, verdict)


@dataclass(frozen=True)
class NoEffect:
    """None of the features correlates with the score beyond ±NEGLIGIBLE."""

    claim: str
    corrs: tuple[Corr, ...]

    def pvalues(self) -> list[float]:
        return [c.within.p for c in self.corrs]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        ws = [c.within for c in self.corrs]
        measured = "; ".join(f"{c.label}: ρ = {c.within.rho:+.2f} (pooled {c.pooled.rho:+.2f})" for c in self.corrs)
        evidence = "; ".join(f"{c.label}: 95% CI [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}], {_p(w.p, a)}"
                             for c, w, a in zip(self.corrs, ws, adjusted))
        if any(math.isnan(w.rho) for w in ws):
            verdict = "inconclusive"
        elif all(-NEGLIGIBLE < w.ci[0] and w.ci[1] < NEGLIGIBLE for w in ws):
            verdict = "supported"
        elif any(a < ALPHA and abs(w.rho) >= NEGLIGIBLE for w, a in zip(ws, adjusted)):
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        return Verdict(self.claim, measured, evidence, verdict)


@dataclass(frozen=True)
class Overdispersed:
    """Scores spread more than Binomial(M, p̄) would spread them (paper Fig. 2)."""

    claim: str
    base: BaselineTest

    def pvalues(self) -> list[float]:
        return [self.base.dispersion_p]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        b = self.base
        ok = not math.isnan(adjusted[0]) and adjusted[0] < ALPHA and b.dispersion > 1
        return Verdict(self.claim, f"dispersion {b.dispersion:.2f} × binomial (p̄ = {b.pooled_p:.2f})",
                       f"over-dispersion {_p(b.dispersion_p, adjusted[0])}; χ² GOF p = {b.chi2_p:.2g}",
                       "supported" if ok else "inconclusive")


@dataclass(frozen=True)
class Paired:
    """An exact sign test on paired 0/1 outcomes: `more` units gain under the claimed side, `fewer` lose."""

    claim: str
    measured: str
    more: int
    fewer: int
    p: float

    def pvalues(self) -> list[float]:
        return [self.p]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        verdict = _signed(adjusted[0], self.more - self.fewer or math.nan, +1)
        return Verdict(self.claim, self.measured,
                       f"sign test on {self.more + self.fewer} discordant updates ({self.more} vs {self.fewer}), "
                       f"{_p(self.p, adjusted[0])}", verdict)


@dataclass(frozen=True)
class Local:
    """The fixed sets' accuracy does not move with the partners' score (an equivalence claim, §5.1)."""

    claim: str
    measured: str
    trend: Trend  # slope of the fixed set's per-merge accuracy on the partners' score, merges resampled
    p: float  # blocked permutation test of equal accuracy across partner bins
    spread: float  # max − min of the fixed sets' accuracy across bins
    merges: tuple[int, ...]  # merges per partner bin

    def pvalues(self) -> list[float]:
        return [self.p]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        t = self.trend
        enough = len(self.merges) >= 3 and min(self.merges) >= MIN_MERGES
        if enough and equivalent(t, MARGIN):
            verdict = "supported"
        elif adjusted[0] < ALPHA and self.spread >= MARGIN:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        return Verdict(self.claim, self.measured,
                       f"slope {t.slope:+.2f}, 95% CI [{t.ci[0]:+.2f}, {t.ci[1]:+.2f}] over {t.n} merges (margin "
                       f"±{MARGIN}; needs ≥ 3 bins of ≥ {MIN_MERGES} merges: {list(self.merges)}); equal accuracy "
                       f"across bins (permutation within fixed set) {_p(self.p, adjusted[0])}", verdict)


@dataclass(frozen=True)
class AllOf:
    """A claim that holds where each of its parts does: supported if every part is, contradicted if any part
    is, otherwise inconclusive (so is a claim of no parts)."""

    claim: str
    parts: tuple
    measured: str = ""  # default: the parts' measurements

    def pvalues(self) -> list[float]:
        return [p for part in self.parts for p in part.pvalues()]

    def decide(self, adjusted: Sequence[float]) -> Verdict:
        out, i = [], 0
        for part in self.parts:
            k = len(part.pvalues())
            out.append(part.decide(adjusted[i : i + k]))
            i += k
        verdicts = [v.verdict for v in out]
        verdict = ("supported" if verdicts and all(v == "supported" for v in verdicts)
                   else "contradicted" if "contradicted" in verdicts else "inconclusive")
        measured = self.measured or "; ".join(f"{v.claim}: {v.measured}" for v in out)
        return Verdict(self.claim, measured, "; ".join(f"{v.claim}: {v.evidence}" for v in out), verdict)


def not_run(claim: str, experiment: str) -> Verdict:
    return Verdict(claim, "—", f"run `mergeability experiment {experiment}`", "inconclusive")


def decide(claims: Sequence) -> list[Verdict]:
    """Every claim's verdict, its p-values Holm-adjusted together with the rest of the table's."""
    raw = [c.pvalues() for c in claims]
    adjusted = iter(holm([p for ps in raw for p in ps]))
    return [c.decide([next(adjusted) for _ in ps]) for c, ps in zip(claims, raw)]


def bin_indicator(scores, which: float) -> np.ndarray:
    """1.0 where the score is `which` (the top or the bottom bin), else 0.0."""
    return (np.asarray(scores, dtype=float) == which).astype(float)


def feature_claims(data: dict, seed: int = 0) -> list:
    """The claims a run's features decide alone (§4, Fig. A.3, A.4), undecided. `data`: aligned arrays
    ('score', 'relation' and every feature of analysis.features)."""
    s, rel = data["score"], data["relation"]

    def c(f: str, y=s, label: str | None = None) -> Corr:
        return correlate(label or f, data[f], y, rel, seed=seed)

    top = bin_indicator(s, 1.0)
    return [
        Directional("The base model's probability gap (top − gold) falls as the score rises (Fig. 3)", c("gap"), -1),
        Directional("The base model's p(gold) rises with the score (Fig. A.3)", c("gold_prob"), +1),
        Directional("The base model's rank of gold falls as the score rises (Fig. A.4)", c("gold_rank"), -1),
        Directional("The post-training improvement in p(gold) rises with the score (Fig. 3)", c("prob_gain"), +1),
        NoEffect("Passage perplexity and length are poor predictors of the score (§4.2)",
                 (c("passage_ppl"), c("passage_tokens"))),
        Directional("The top score bin has higher passage perplexity than the rest (§4.2)",
                    c("passage_ppl", top, "perplexity vs top bin"), +1),
        NoEffect("Weight norm and top singular value do not correlate with the score (§4.3)",
                 (c("fro_norm"), c("top_sv"))),
        AllOf("The top score bin has slightly higher ‖ΔW‖ and σ_max than the rest (§4.3)",
              (Directional("‖ΔW‖", c("fro_norm", top), +1), Directional("σ_max", c("top_sv", top), +1))),
    ]


EXPERIMENT_CLAIMS = {  # key in a report's experiment sections -> (claim text, the experiment that decides it)
    "locality": ("Mergeability is local: high-score updates stay stable whatever partners (§5.1)", "locality"),
    "partners_trend": ("Partners' own accuracy rises with their score (§5.1)", "locality"),
    "weaker_methods": ("Weaker merge methods put more updates at score 1.0 (§5.2)", "algorithms"),
    "ties_between": ("TIES sits between mean and KnOTS at score 1.0; mean is bimodal (§5.2)", "algorithms"),
    "methods_agree": ("Scores agree across merge methods (A.9)", "algorithms"),
    "gap_by_method": ("The gap trend holds under TIES but not under mean (A.9)", "algorithms"),
    "mn_agree": ("Scores agree across M and N (A.3)", "robustness"),
}


def example_level_claims(data: dict, base: BaselineTest, experiments: dict | None = None, seed: int = 0) -> list:
    """The claims table of an example-level run, undecided (pass it to `decide`)."""
    ex = experiments or {}
    rest = [ex.get(k) or not_run(text, name) for k, (text, name) in EXPERIMENT_CLAIMS.items()]
    return [Overdispersed("Mergeability differs from the binomial baseline (Fig. 2)", base),
            *feature_claims(data, seed), *rest]
