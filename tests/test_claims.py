"""Known-answer tests of the claims table's rules (analysis/claims.py): decisions within relation, Holm across the
table, the power figure, §5.1 locality as the paper's experiment, and the claims the study added. Each rule is run on
data with a planted structure that must decide "supported", the opposite structure "contradicted", and a confound
or too little data "inconclusive"."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from mergeability.analysis.claims import (
    ALPHA,
    DETECT,
    AllOf,
    Corr,
    Directional,
    Local,
    NoEffect,
    Overdispersed,
    Verdict,
    correlate,
    decide,
    feature_claims,
    pooled_only,
)
from mergeability.analysis.experiments import locality_stats
from mergeability.analysis.features import FEATURES
from mergeability.analysis.inference import Stratified, Trend, holm, spearman_power, spearman_power_n
from mergeability.analysis.stats import Correlation, binomial_baseline, spearman
from mergeability.config import from_flat
from mergeability.errors import MergeabilityError
from mergeability.estimate import params_key
from mergeability.experiments import locality
from mergeability.experiments.robustness import Robustness
from mergeability.report.experiments import (
    algorithms_claims,
    locality_section,
    other_partner_counts,
    robustness_section,
)
from mergeability.report.tasks import task_claims
from mergeability.store import Store

GAP = "The base model's probability gap (top − gold) falls as the score rises (Fig. 3)"


def study_data(kind: str, n_rel: int = 5, per: int = 40, seed: int = 0) -> dict:
    """Per-update arrays as analysis.features gives them. `kind`:
    'confound': relation sets both the gap and the score; within a relation they are independent;
    'within':   within every relation a lower gap means a higher score (relations also differ in level);
    'noise':    nothing relates to anything."""
    rng = np.random.default_rng(seed)
    n = n_rel * per
    level = np.repeat(np.arange(n_rel, dtype=float), per)
    z = rng.normal(size=n)
    if kind == "confound":
        gap, score = -level + rng.normal(0, 0.3, n), level / n_rel + rng.normal(0, 0.05, n)
    elif kind == "within":
        gap, score = -level + z, level / n_rel - 0.3 * z + rng.normal(0, 0.05, n)
    else:
        gap, score = rng.normal(size=n), rng.normal(size=n)
    data = {f: rng.normal(size=n) for f in FEATURES}
    data.update(id=np.array([f"u{i:03d}" for i in range(n)]), relation=np.repeat([f"r{k}" for k in range(n_rel)], per),
                subject=np.array([f"s{i:03d}" for i in range(n)]), score=score, gap=gap)
    return data


def by_claim(verdicts, text: str) -> Verdict:
    return next(v for v in verdicts if v.claim == text)


# ------------------------------------------------------------------ within relation vs pooled


def test_a_correlation_made_by_relation_alone_is_not_supported():
    d = study_data("confound")
    pooled = spearman(d["gap"], d["score"])
    assert pooled.rho < -0.8 and pooled.p < 1e-6  # pooled, the gap claim looks overwhelming ...
    (as_pooled,) = decide([Directional("gap", pooled_only("gap", pooled), -1)])
    assert as_pooled.verdict == "supported"
    v = by_claim(decide(feature_claims(d)), GAP)  # ... within relation there is nothing
    assert v.verdict == "inconclusive", v
    assert "pooled -0.8" in v.measured or "pooled -0.9" in v.measured
    assert "needed to detect" in v.evidence  # an inconclusive correlation says what n would decide


def test_a_correlation_that_holds_within_relations_is_supported_both_ways():
    d = study_data("within")
    pooled = spearman(d["gap"], d["score"])
    assert pooled.rho < 0 and pooled.p < 1e-6
    v = by_claim(decide(feature_claims(d)), GAP)
    assert v.verdict == "supported", v
    c = correlate("gap", d["gap"], d["score"], d["relation"])
    assert c.within.rho < -0.5 and c.within.strata == 5 and c.within.n == 200
    (reverse,) = decide([Directional("gap rises", c, +1)])
    assert reverse.verdict == "contradicted"


def test_noise_is_inconclusive_and_no_effect_is_supported():
    d = study_data("noise", per=80)
    verdicts = decide(feature_claims(d))
    assert by_claim(verdicts, GAP).verdict == "inconclusive"
    c = correlate("noise", d["fro_norm"], d["score"], d["relation"])
    assert -0.3 < c.within.ci[0] and c.within.ci[1] < 0.3
    (v,) = decide([NoEffect("no effect", (c,))])
    assert v.verdict == "supported"
    strong = correlate("strong", d["score"] + 0.01 * d["fro_norm"], d["score"], d["relation"])
    (v,) = decide([NoEffect("no effect", (c, strong))])
    assert v.verdict == "contradicted"


# ------------------------------------------------------------------ Holm across the table


def fixed_p(p: float, rho: float = 0.5, n: int = 60) -> Corr:
    """A correlation with a given p-value (the test itself is someone else's)."""
    c = Correlation(rho, p, (rho - 0.2, rho + 0.2), n)
    return Corr("x", c, Stratified(rho, p, c.ci, n, 3))


def test_holm_adjusts_across_the_whole_table():
    alone = decide([Directional("a", fixed_p(0.01), +1)])
    assert alone[0].verdict == "supported"
    ps = [0.01, 0.02, 0.03, 0.04, 0.5]
    # by hand: sorted p × (m − rank), running maximum: 0.05, 0.08, 0.09, max(0.08, 0.09) = 0.09, 0.5
    assert holm(ps) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.5])
    table = decide([Directional(f"c{i}", fixed_p(p), +1) for i, p in enumerate(ps)])
    assert [v.verdict for v in table] == ["inconclusive"] * 5  # 0.01 alone decides; among five it does not
    assert "Holm 0.05" in table[0].evidence and "p = 0.01" in table[0].evidence
    # claims with several tests take their share of the adjusted values, in order
    parts = AllOf("both", (Directional("p1", fixed_p(0.001), +1), Directional("p2", fixed_p(0.002), +1)))
    (v, w) = decide([parts, Directional("c", fixed_p(0.5), +1)])
    assert v.verdict == "supported" and "Holm 0.003" in v.evidence and "Holm 0.004" in v.evidence
    assert w.verdict == "inconclusive"


def test_decided_verdicts_pass_through_and_take_no_share():
    done = Verdict("done", "m", "e", "supported")
    table = decide([done, Directional("a", fixed_p(0.03), +1)])
    assert table[0] is done and table[1].verdict == "supported"  # one test in the family: Holm = raw


@pytest.mark.parametrize("parts, expected", [
    (["supported", "supported"], "supported"),
    (["supported", "contradicted"], "contradicted"),
    (["inconclusive", "contradicted"], "contradicted"),
    (["supported", "inconclusive"], "inconclusive"),
    ([], "inconclusive"),
])
def test_all_of_truth_table(parts, expected):
    v = decide([AllOf("claim", tuple(Verdict(f"p{i}", "m", "e", x) for i, x in enumerate(parts)))])[0]
    assert v.verdict == expected


# ------------------------------------------------------------------ power


def test_power_note_matches_the_formula():
    need = spearman_power_n(DETECT, ALPHA, 0.8)
    z = 1.959963984540054 + 0.8416212335729143
    assert need == math.ceil(3 + (1 + DETECT**2 / 2) * (z / math.atanh(DETECT)) ** 2)
    (v,) = decide([Directional("weak", fixed_p(0.4, rho=0.1, n=40), +1)])
    assert v.verdict == "inconclusive"
    assert f"n = 40; ≈{need} needed" in v.evidence
    assert f"power now {spearman_power(DETECT, 40, ALPHA):.0%}" in v.evidence


# ------------------------------------------------------------------ the binomial baseline


def test_overdispersion_decides_bimodal_scores_and_not_binomial_ones():
    rng = np.random.default_rng(0)
    bimodal = np.r_[np.zeros(60), np.ones(60), rng.integers(0, 6, 20) / 5]
    binom = rng.binomial(5, 0.5, 300) / 5
    (v,) = decide([Overdispersed("x", binomial_baseline(bimodal, 5))])
    (w,) = decide([Overdispersed("x", binomial_baseline(binom, 5))])
    assert (v.verdict, w.verdict) == ("supported", "inconclusive")


# ------------------------------------------------------------------ locality (§5.1) as the paper runs it


def locality_store(tmp_path, n: int, fixed_acc, partners_follow_score: bool = True):
    """A real store holding every merge of the locality experiment over `n` updates with scores (i mod 4)/3 and
    three relations. In a merge with partners of bin b, the j-th fixed update is correct iff j mod 10 <
    10 · fixed_acc(b); a partner is correct iff its own score is ≥ 0.5 (or always)."""
    cfg = from_flat("examples", trials=3, partners=9, seed=0)
    main = {f"u{i:03d}": (i % 4) / 3 for i in range(n)}
    data = {"id": np.array(sorted(main)), "relation": np.array([f"r{int(i[1:]) % 3}" for i in sorted(main)]),
            "subject": np.array([f"s{i}" for i in sorted(main)])}
    store = Store(tmp_path / "results.sqlite")
    seen = 0
    for key, spec in locality.units(cfg, main, {i: f"s{i}" for i in main}):
        correct = {m: int(main[m] >= 0.5 or not partners_follow_score) for m in spec["merge"]}
        for f in spec["fixed"]:
            correct[f] = int(seen % 10 < round(10 * fixed_acc(spec["bin"])))
            seen += 1
        store.add_experiment("locality", key, {"correct": correct})
    return cfg, store, main, data


def test_locality_units_are_the_papers_design():
    cfg = from_flat("examples", trials=3, partners=9, seed=0)
    main = {f"u{i:03d}": (i % 4) / 3 for i in range(120)}
    units = locality.units(cfg, main)
    sets = {tuple(s["fixed"]) for _, s in units}
    assert len(sets) == locality.FIXED_SETS - 1  # 30 top-score updates: three disjoint sets of five
    assert all(main[i] == 1.0 for s in sets for i in s) and len({i for s in sets for i in s}) == 15
    for _, s in units:
        assert len(s["merge"]) == cfg.merge.partners + 1 and len(set(s["merge"])) == len(s["merge"])
        partners = [i for i in s["merge"] if i not in s["fixed"]]
        assert all(main[i] == s["bin"] for i in partners) and not set(partners) & {i for f in sets for i in f}
    assert len(units) == 3 * 4 * locality.REPEATS  # sets × bins × repeats


@pytest.mark.parametrize("name, n, fixed_acc, verdict", [
    ("flat", 120, lambda b: 0.9, "supported"),  # the fixed sets stay at 0.9 whatever the partners
    ("rising", 120, lambda b: 0.1 + 0.8 * b, "contradicted"),  # the fixed sets follow the partners' score
    ("falling", 120, lambda b: 0.9 - 0.8 * b, "contradicted"),
    ("too small", 40, lambda b: 0.7 + 0.1 * (b > 0.5), "inconclusive"),  # one set of five: the CI is too wide
])
def test_locality_verdicts(tmp_path, name, n, fixed_acc, verdict):
    cfg, store, main, data = locality_store(tmp_path, n, fixed_acc)
    claims = locality_section(cfg, store, main, tmp_path, data).claims
    v, partners = decide([claims["locality"], claims["partners_trend"]])
    assert v.verdict == verdict, (name, v)
    assert "permutation within fixed set" in v.evidence and "slope" in v.evidence
    if n == 120:
        assert partners.verdict == "supported", partners  # partners do as well as their own score says


def test_locality_partners_that_ignore_their_score_are_not_a_trend(tmp_path):
    cfg, store, main, data = locality_store(tmp_path, 120, lambda b: 0.9, partners_follow_score=False)
    claims = locality_section(cfg, store, main, tmp_path, data).claims
    (partners,) = decide([claims["partners_trend"]])
    assert partners.verdict == "inconclusive"


def test_locality_section_needs_every_merge(tmp_path):
    cfg, store, main, data = locality_store(tmp_path, 120, lambda b: 0.9)
    key = next(iter(store.experiment_rows("locality")))
    store.db.execute("DELETE FROM experiments WHERE key = ?", (key,))
    assert locality_section(cfg, store, main, tmp_path, data).claims == {}


# ------------------------------------------------------------------ §5.2 and A.9 over other methods' scores


def method_scores(n: int = 60, order=("knots", "ties", "mean"), seed: int = 0) -> tuple[dict, dict]:
    """Nested tops: the first method has 12 updates at 1.0, the second those and 12 more, the third 12 more; the
    last is bimodal. Scores fall with the gap under every method but the last, where they ignore it."""
    rng = np.random.default_rng(seed)
    ids = [f"u{i:03d}" for i in range(n)]
    gap = rng.random(n)
    rank = np.argsort(gap)  # lowest gaps first
    out = {}
    for k, m in enumerate(order):
        s = np.full(n, 0.4)
        s[rank[n // 2:]] = 0.2
        s[rank[: 12 * (k + 1)]] = 1.0
        if k == len(order) - 1:
            s = np.where(rng.random(n) < 0.5, 0.0, 1.0)
            s[rank[: 12 * (k + 1)]] = 1.0
        out[m] = dict(zip(ids, s))
    data = {"id": np.array(ids), "relation": np.array([f"r{i % 3}" for i in range(n)]), "gap": gap}
    return out, data


def test_ties_between_mean_and_knots_and_the_gap_under_each_method():
    methods, data = method_scores()
    cfg = from_flat("examples", method="knots", trials=5, partners=10)
    corrs = {m: correlate(f"knots vs {m}", [methods["knots"][i] for i in data["id"]],
                          [methods[m][i] for i in data["id"]], data["relation"]) for m in ("ties", "mean")}
    claims = algorithms_claims(cfg, methods, corrs, data)
    verdicts = dict(zip(claims, decide(list(claims.values()))))
    assert verdicts["weaker_methods"].verdict == "supported"  # 24 more at 1.0 under mean, none fewer
    assert verdicts["ties_between"].verdict == "supported", verdicts["ties_between"]
    # mean's 36 tops are the 36 lowest gaps: the trend holds under mean too, which A.9 says it does not
    assert verdicts["gap_by_method"].verdict == "contradicted"
    reversed_methods, _ = method_scores(order=("mean", "ties", "knots"))
    claims = algorithms_claims(cfg, reversed_methods, corrs, data)
    verdicts = dict(zip(claims, decide(list(claims.values()))))
    assert verdicts["weaker_methods"].verdict == "contradicted"
    assert verdicts["ties_between"].verdict == "contradicted"


def test_gap_trend_under_ties_and_not_under_mean():
    rng = np.random.default_rng(1)
    n = 400
    ids = [f"u{i:03d}" for i in range(n)]
    gap = rng.random(n)
    ties = np.clip(np.round((1 - gap) * 5 + rng.normal(0, 0.7, n)), 0, 5) / 5  # falls with the gap
    mean = rng.choice([0.0, 1.0], n)  # bimodal and blind to the gap
    data = {"id": np.array(ids), "relation": np.array([f"r{i % 4}" for i in range(n)]), "gap": gap}
    methods = {"knots": dict(zip(ids, ties)), "ties": dict(zip(ids, ties)), "mean": dict(zip(ids, mean))}
    cfg = from_flat("examples", method="knots", trials=5, partners=10)
    claims = algorithms_claims(cfg, methods, {}, data)
    (v,) = decide([claims["gap_by_method"]])
    assert v.verdict == "supported", v
    methods["ties"] = dict(zip(ids, rng.permutation(ties)))  # TIES loses the trend: the claim's first half fails
    (v,) = decide([algorithms_claims(cfg, methods, {}, data)["gap_by_method"]])
    assert v.verdict == "inconclusive", v


# ------------------------------------------------------------------ robustness reads every N the store holds


def test_other_partner_counts_reads_the_runs_own_method_only(tmp_path):
    cfg = from_flat("examples", method="knots", trials=2, partners=10)
    store = Store(tmp_path / "results.sqlite")
    for method, params in [("knots", {"partners": 10}), ("knots", {"partners": 5}), ("knots", {"partners": 25}),
                           ("ties", {"partners": 3}), ("knots", {"density": 1.0, "partners": 4})]:
        store.add_trial({"target": "u1", "trial": 0, "method": method, "params": params_key(method, params),
                         "partners": [], "correct": 1, "probs": []})
    assert other_partner_counts(cfg, store) == [5, 25]


def test_locality_fixed_sets_form_when_top_subjects_are_few():
    cfg = from_flat("examples", trials=3, partners=9, seed=0)
    main = {f"u{i:03d}": (i % 4) / 3 for i in range(120)}
    few = {i: ("top" + str(int(i[1:]) % 3) if main[i] == 1.0 else i) for i in main}  # 30 top updates, 3 subjects
    units = locality.units(cfg, main, few)
    assert units, "no fixed set formed"
    for _, s in units:
        assert len({few[m] for m in s["merge"]}) == len(s["merge"]) == 10  # distinct subjects, full size


def test_locality_random_merge_effects_do_not_fake_a_bin_effect():
    """The fixed updates of a merge share its partners: a random effect per merge and no bin effect must not
    reject equal accuracy more often than α, nor give a slope CI that misses 0 much more often than 5 %."""
    rng = np.random.default_rng(0)
    rejected = missed = 0
    sims = 60
    for sim in range(sims):
        done = []
        for s in range(4):
            fixed = [f"f{s}{j}" for j in range(5)]
            for b in np.linspace(0, 1, 6):
                for rep in range(3):
                    p = np.clip(0.6 + rng.normal(0, 0.25), 0, 1)  # the merge's own luck, shared by its fixed set
                    correct = {f: int(rng.random() < p) for f in fixed}
                    correct.update({f"p{s}{b}{rep}{k}": 1 for k in range(5)})
                    done.append(({"set": s, "fixed": fixed, "bin": float(b), "rep": rep}, {"correct": correct}))
        t = locality_stats(done, seed=sim)
        rejected += t.p < 0.05
        missed += not (t.trend.ci[0] <= 0 <= t.trend.ci[1])
    assert rejected / sims <= 0.12 and missed / sims <= 0.15, (rejected, missed)


@pytest.mark.parametrize("merges, verdict", [((12, 12, 12), "supported"), ((3, 3, 3), "inconclusive"),
                                             ((12, 12), "inconclusive")])
def test_locality_stable_needs_enough_bins_and_merges(merges, verdict):
    always_right = Trend(0.0, (0.0, 0.0), sum(merges), sum(merges))  # a fixed set correct in every merge
    (v,) = decide([Local("local", "m", always_right, 1.0, 0.0, merges)])
    assert v.verdict == verdict


@pytest.mark.parametrize("shift, verdict", [(5.0, "supported"), (-5.0, "contradicted"), (0.0, "inconclusive")])
def test_task_level_lowest_bin_norms(shift, verdict):
    """Table 1 (task level): tasks in the lowest score bin have higher ‖ΔW‖ and σ_max than all others."""
    rng = np.random.default_rng(0)
    n = 60
    score = np.r_[rng.uniform(0, 0.19, 20), rng.uniform(0.2, 1, n - 20)]
    low = score < 0.2
    d = {"score": score, "fro_norm": rng.normal(10, 1, n) + shift * low, "top_sv": rng.normal(8, 1, n) + shift * low}
    flat = spearman(rng.random(n), score)
    corr = {f: flat for f in ("base_acc", "answer_ppl", "train_tokens", "fro_norm", "top_sv")}
    claims = task_claims(d, corr, flat, {}, {})
    assert by_claim(claims, "The lowest score bin has higher ‖ΔW‖ and σ_max than the rest (Table 1)").verdict == verdict


def test_robustness_scores_a_seeded_sample_of_the_updates():
    updates = {f"u{i:03d}": None for i in range(100)}
    sample = Robustness((5,), scored=40).sample(updates, seed=0)
    assert len(sample) == len(set(sample)) == 40 and set(sample) <= set(updates) and sample == sorted(sample)
    assert Robustness((5,), scored=40).sample(updates, seed=0) == sample  # resumes draw the same updates
    assert Robustness((5,), scored=40).sample(updates, seed=1) != sample
    assert Robustness((5,)).sample(updates, seed=0) == sorted(updates)
    assert Robustness((5,), scored=200).sample(updates, seed=0) == sorted(updates)
    with pytest.raises(MergeabilityError, match="scored"):
        Robustness((5,), scored=3)


def test_robustness_section_compares_a_sampled_m_and_n_on_the_updates_they_scored(tmp_path):
    cfg = from_flat("examples", method="knots", trials=2, partners=10)
    rng = np.random.default_rng(0)
    ids = [f"u{i:03d}" for i in range(60)]
    main = {i: float(rng.integers(0, 3)) / 2 for i in ids}
    store = Store(tmp_path / "results.sqlite")
    for i in ids:
        # trials 1..M at N=10 (the run's key) on every update; M+1..2M and N=25 only on the first 40 (the sample)
        for t in range(4 if i in ids[:40] else 2):
            key = params_key("knots", {"partners": 10})
            store.add_trial({"target": i, "trial": t, "method": "knots", "params": key,
                             "partners": [], "correct": int(main[i] >= t % 2 / 2), "probs": []})
    for i in ids[:40]:
        for t in range(2):
            key = params_key("knots", {"partners": 25})
            store.add_trial({"target": i, "trial": t, "method": "knots", "params": key,
                             "partners": [], "correct": int(main[i] > 0), "probs": []})
    data = {"id": np.array(ids), "relation": np.array(["r"] * 60), "subject": np.array(ids),
            "score": np.array([main[i] for i in ids])}
    out = robustness_section(cfg, store, main, tmp_path, data)
    rows = {r[0]: r for r in out.tables[0].rows}
    assert "N=10 vs N=25 (M=2, on 40 of 60 updates)" in rows
    assert float(rows["N=10 vs N=25 (M=2, on 40 of 60 updates)"][1]) > 0.5
    assert float(rows["trials 1–2 vs trials 3–4 (N=10, on 40 of 60 updates)"][1]) > 0.5
    store.close()


def test_robustness_scores_more_trials_and_other_n_on_one_sample(monkeypatch):
    from mergeability.experiments import robustness

    updates = {f"u{i:03d}": None for i in range(50)}
    calls = []
    monkeypatch.setattr(robustness, "kept_updates", lambda ctx: updates)
    monkeypatch.setattr(robustness, "main_scores", lambda ctx, ups: None)
    monkeypatch.setattr(robustness, "add_trials", lambda ctx, ups, label, console, **kw: calls.append((label, kw)))
    ctx = SimpleNamespace(cfg=from_flat("examples", method="knots", trials=2, partners=10, seed=0))
    experiment = Robustness((5, 25), scored=30)
    experiment.run(ctx, None)
    sample = experiment.sample(updates, 0)
    assert [label for label, _ in calls] == ["M=4", "N=5", "N=25"]
    assert all(kw["targets"] == sample for _, kw in calls) and len(sample) == 30
    assert calls[0][1]["first_trial"] == 2 and calls[0][1]["trials"] == 4
