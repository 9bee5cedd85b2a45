"""Known-answer tests of the follow-up experiments' statistics (analysis/experiments.py) and of `all_of`: for each,
data whose structure must decide "supported", the opposite structure "contradicted", and noisy or too-small data
"inconclusive"; p-values are checked against SciPy (or the closed form) computed here, independently."""

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from mergeability.analysis.claims import ALPHA, Verdict, all_of, directional
from mergeability.analysis.experiments import locality_test, retention_changes, sign_test
from mergeability.analysis.stats import bootstrap_ci, spearman
from mergeability.config import from_flat
from mergeability.experiments import locality, weighted
from mergeability.report.experiments import locality_section, weaker_methods_claim
from mergeability.report.weighted import weighted_section
from mergeability.store import Store

# ------------------------------------------------------------------ sign_test (§5.2: weaker methods at 1.0)


def paired(more: int, fewer: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """(A, B) top-or-not per unit: `more` units at the top under B only, `fewer` under A only, the rest concordant."""
    a = [False] * more + [True] * fewer + [True] * both + [False] * neither
    b = [True] * more + [False] * fewer + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize("more, fewer, verdict", [
    (20, 0, "supported"),  # B (the mean merge) puts 20 more updates at 1.0 and none fewer
    (16, 2, "supported"),
    (0, 20, "contradicted"),  # the opposite
    (2, 16, "contradicted"),
    (9, 9, "inconclusive"),  # discordant both ways alike: noise
    (3, 0, "inconclusive"),  # the right direction, but too few discordant units for p < 0.05
    (0, 0, "inconclusive"),  # no discordant unit at all: no test
])
def test_sign_test_counts_p_and_verdict(more, fewer, verdict):
    own, mean = paired(more, fewer, both=7, neither=11)  # concordant units carry no information
    t = sign_test(own, mean)
    assert (t.more, t.fewer) == (more, fewer)
    if more + fewer == 0:
        assert math.isnan(t.p)
    else:
        assert t.p == pytest.approx(st.binomtest(more, more + fewer, 0.5, alternative="two-sided").pvalue, rel=1e-12)
        # and the exact two-sided binomial tail, by hand
        k, n = min(more, fewer), more + fewer
        assert t.p == pytest.approx(min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n), rel=1e-12)
    v = weaker_methods_claim("knots", own, mean)
    assert v.verdict == verdict
    assert f"{more + fewer} discordant" in v.evidence


def test_sign_test_known_p_and_symmetry():
    a, b = paired(20, 0)
    assert sign_test(a, b).p == pytest.approx(2 * 0.5**20, rel=1e-12)
    flipped = sign_test(b, a)  # swapping A and B swaps more and fewer, never the p-value
    assert (flipped.more, flipped.fewer) == (0, 20) and flipped.p == sign_test(a, b).p


# ------------------------------------------------------------------ locality_test (§5.1, Fig. 5)

LOCAL_CFG = dict(trials=3, partners=2, seed=0)


def locality_run(tmp_path, n: int, correct_of_bin: dict[float, int], period: int):
    """A real store holding every unit of the locality experiment over `n` updates with scores (i mod 4)/3.
    The fixed update is correct in the j-th unit of a partner bin iff j mod `period` < correct_of_bin[bin]; the
    partners are always correct. Returns (cfg, store, main scores, the fixed outcomes per bin written)."""
    cfg = from_flat("examples", **LOCAL_CFG)
    main = {f"u{i:02d}": (i % 4) / 3 for i in range(n)}
    store = Store(tmp_path / "results.sqlite")
    fixed: dict[float, list[int]] = {}
    for key, spec in locality.units(cfg, main):
        outcomes = fixed.setdefault(spec["bin"], [])
        correct = {m: 1 for m in spec["merge"]}
        correct[spec["fixed"]] = int(len(outcomes) % period < correct_of_bin[spec["bin"]])
        outcomes.append(correct[spec["fixed"]])
        store.add_experiment("locality", key, {"correct": correct})
    assert set(fixed) == set(correct_of_bin)  # every bin the case names is one the experiment merges with
    return cfg, store, main, fixed


def pearson_chi2_p(fixed: dict[float, list[int]]) -> float:
    """χ² test of independence of (correct, wrong) and bin, by hand (no continuity correction: > 2 bins)."""
    obs = np.array([[sum(v), len(v) - sum(v)] for _, v in sorted(fixed.items())], dtype=float)
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(st.chi2.sf(stat, (obs.shape[0] - 1) * (obs.shape[1] - 1)))


BINS = (0.0, 1 / 3, 2 / 3)  # 40 updates: the top 10 (all of bin 1.0) are fixed, partners come from the others


@pytest.mark.parametrize("name, n, correct, period, verdict", [
    # 30 merges per bin; the fixed set's accuracy is 0.9 whatever its partners: local
    ("flat", 40, dict.fromkeys(BINS, 9), 10, "supported"),
    # 0.1, 0.5, 0.9 as the partners' score rises: the fixed set depends on its partners
    ("rising", 40, dict(zip(BINS, (1, 5, 9))), 10, "contradicted"),
    # the opposite slope is just as non-local
    ("falling", 40, dict(zip(BINS, (9, 5, 1))), 10, "contradicted"),
    # 8 updates: 6 merges per bin, accuracies 0.5, 0.83, 0.83: a spread of 0.33 that so few merges cannot test
    ("too small", 8, dict(zip(BINS, (3, 5, 5))), 6, "inconclusive"),
])
def test_locality_test_p_spread_and_verdict(tmp_path, name, n, correct, period, verdict):
    cfg, store, main, fixed = locality_run(tmp_path, n, correct, period)
    t = locality_test(fixed)
    acc = [np.mean(fixed[b]) for b in sorted(fixed)]
    assert t.spread == pytest.approx(max(acc) - min(acc), abs=1e-12)
    assert t.spread == pytest.approx((max(correct.values()) - min(correct.values())) / period, abs=1e-12)
    if len({sum(v) / len(v) for v in fixed.values()}) == 1:
        assert t.p == pytest.approx(1.0)  # identical rows: no dependence at all
    else:
        assert t.p == pytest.approx(pearson_chi2_p(fixed), rel=1e-9)
        table = [[sum(v), len(v) - sum(v)] for _, v in sorted(fixed.items())]
        assert t.p == pytest.approx(st.chi2_contingency(table)[1], rel=1e-9)
    if verdict == "inconclusive":
        assert t.p >= ALPHA and t.spread >= 0.25  # the data's own shape: a spread, but not significant
    got = locality_section(cfg, store, main, tmp_path).claims["locality"]
    assert got.verdict == verdict, (name, t)
    assert f"p = {t.p:.2g}" in got.evidence


def test_locality_test_untestable_is_p_one():
    assert locality_test({0.0: [1, 1, 1], 0.5: [1, 1], 1.0: [1]}).p == 1.0  # nobody wrong: nothing to test
    assert locality_test({0.0: [0, 0], 1.0: [0, 0, 0]}).p == 1.0  # nobody right
    single = locality_test({0.5: [1, 0, 1, 0]})  # one bin: no dependence to test
    assert single.p == 1.0 and single.spread == 0.0


def test_locality_two_bins_match_scipy_with_yates():
    fixed = {0.0: [1] * 4 + [0] * 16, 1.0: [1] * 15 + [0] * 5}
    t = locality_test(fixed)
    # 2 × 2: chi2_contingency applies Yates' correction by default; by hand: |ad − bc| shrunk by n/2
    a, b, c, d = 4, 16, 15, 5
    n = a + b + c + d
    stat = n * max(0.0, abs(a * d - b * c) - n / 2) ** 2 / ((a + b) * (c + d) * (a + c) * (b + d))
    assert t.p == pytest.approx(st.chi2.sf(stat, 1), rel=1e-9)
    assert t.p == pytest.approx(st.chi2_contingency([[a, b], [c, d]])[1], rel=1e-9)
    assert t.p < ALPHA and t.spread == pytest.approx(0.55)


# ------------------------------------------------------------------ retention_changes (§6, Fig. 7)

TASKS = {f"t{k}": dict(base_acc=0.05 + 0.1 * k, ft_acc=(0.8, 0.5)[k % 2]) for k in range(8)}  # t0..t3 weak
SPEC = weighted.Weighted(sets=8, low=2, high=2, temperature=0.5, sweep=(2.0,), methods=("mean", "ties"))


def retention_run(tmp_path, weak_delta, strong_delta):
    """A real store holding every unit of the weighted experiment on TASKS: each task's accuracy after the plain
    merge is its base accuracy; after a weighted merge of set s it moves by weak_delta(s) or strong_delta(s).
    Returns (store, the expected change in retained accuracy per (method, T))."""
    store = Store(tmp_path / "results.sqlite")
    for name, row in TASKS.items():
        store.add_task(dict(name=name, path=f"tasks/{name}", **row))
    sets = weighted.task_sets({n: r["base_acc"] for n, r in TASKS.items()}, SPEC, seed=0)
    expected: dict[tuple[str, float], dict[str, list[float]]] = {}
    for key, u in weighted.units(SPEC, sets):
        acc = {n: TASKS[n]["base_acc"] for n in u["weak"] + u["strong"]}
        if u["T"] is not None:
            e = expected.setdefault((u["method"], u["T"]), {"weak": [], "strong": []})
            for group, delta in (("weak", weak_delta), ("strong", strong_delta)):
                for n in u[group]:
                    acc[n] += delta(u["set"])
                    e[group].append(delta(u["set"]) / TASKS[n]["ft_acc"])
        store.add_experiment("weighted", key, {"acc": acc, "weights": None})
    store.set_meta("weighted_spec", {"temperature": SPEC.temperature, "low": SPEC.low, "high": SPEC.high})
    return store, expected


@pytest.mark.parametrize("name, weak, strong, verdict", [
    ("weak gain, strong kept", lambda s: 0.2, lambda s: -0.02, "supported"),
    ("weak lose", lambda s: -0.2, lambda s: 0.1, "contradicted"),
    ("weak gain, strong collapse", lambda s: 0.2, lambda s: -0.4, "inconclusive"),  # the claim's 2nd half fails
    ("noise", lambda s: (0.15, -0.15)[s % 2], lambda s: 0.0, "inconclusive"),
])
def test_retention_changes_and_verdict(tmp_path, name, weak, strong, verdict):
    store, expected = retention_run(tmp_path, weak, strong)
    rows, tasks = store.experiment_rows("weighted"), {r["name"]: r for r in store.task_rows()}
    changes = retention_changes(rows, tasks)
    assert [(r.method, r.T) for r in changes] == [("mean", 0.5), ("mean", 2.0), ("ties", 0.5)]
    for r in changes:
        e = expected[(r.method, r.T)]
        assert len(r.weak) == SPEC.sets * SPEC.low and len(r.strong) == SPEC.sets * SPEC.high
        # the lists follow the sets in order: compare element by element, not just their means
        np.testing.assert_allclose(r.weak, e["weak"], rtol=1e-9)
        np.testing.assert_allclose(r.strong, e["strong"], rtol=1e-9)
    main = next(r for r in changes if r.method == "mean" and r.T == SPEC.temperature)
    v = weighted_section(store, tmp_path).claims["weighted"]
    assert v.verdict == verdict, (name, v)
    cw = bootstrap_ci(main.weak)
    assert f"weak [{cw[0]:+.3f}, {cw[1]:+.3f}]" in v.evidence


def test_retention_bootstrap_ci_agrees_with_scipy(tmp_path):
    store, _ = retention_run(tmp_path, lambda s: 0.05 * (s - 2), lambda s: 0.0)
    rows, tasks = store.experiment_rows("weighted"), {r["name"]: r for r in store.task_rows()}
    weak = next(r for r in retention_changes(rows, tasks) if r.method == "mean" and r.T == 0.5).weak
    ours = bootstrap_ci(weak)
    ref = st.bootstrap((np.array(weak),), np.mean, method="percentile", n_resamples=20000, random_state=0)
    # two Monte-Carlo estimates of one interval: equal to within the resampling noise
    assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.02)
    assert bootstrap_ci([0.25] * 16) == (0.25, 0.25)  # no spread: the interval is the point


def test_retention_skips_sets_without_a_plain_merge():
    key = lambda T: json.dumps({"set": 0, "method": "mean", "T": T, "weak": ["t0"], "strong": ["t7"]})  # noqa: E731
    rows = {key(0.5): {"acc": {"t0": 0.5, "t7": 0.9}}}
    assert retention_changes(rows, TASKS) == []  # a weighted merge alone: nothing to compare with
    rows[key(None)] = {"acc": {"t0": 0.1, "t7": 0.9}}
    (r,) = retention_changes(rows, TASKS)
    assert r.weak == pytest.approx([(0.5 - 0.1) / 0.8]) and r.strong == pytest.approx([0.0])


# ------------------------------------------------------------------ all_of (a claim made of parts)


def verdict(v: str, evidence: str = "") -> Verdict:
    return Verdict("part", "m", evidence or f"{v} evidence", v)


@pytest.mark.parametrize("parts, expected", [
    (["supported", "supported", "supported"], "supported"),
    (["supported"], "supported"),
    (["contradicted", "contradicted"], "contradicted"),
    (["supported", "contradicted"], "contradicted"),  # one part failing contradicts the whole
    (["inconclusive", "contradicted"], "contradicted"),
    (["supported", "inconclusive"], "inconclusive"),  # not every part shown
    (["inconclusive", "inconclusive"], "inconclusive"),
    ([], "inconclusive"),  # no parts: nothing shown
])
def test_all_of_truth_table(parts, expected):
    v = all_of("claim", "measured", [verdict(p, f"e{i}") for i, p in enumerate(parts)])
    assert v.verdict == expected
    assert (v.claim, v.measured) == ("claim", "measured")
    assert v.evidence == "; ".join(f"e{i}" for i in range(len(parts)))


@pytest.mark.parametrize("ys, expected", [
    (("rising", "rising"), "supported"),  # both comparisons agree strongly
    (("rising", "falling"), "contradicted"),  # one is reversed
    (("rising", "noise"), "inconclusive"),  # one shows nothing
    (("tiny", "tiny"), "inconclusive"),  # four points: too few for p < 0.05
])
def test_all_of_over_real_correlations(ys, expected):
    rng = np.random.default_rng(3)
    x = np.arange(40, dtype=float)
    make = {"rising": lambda: x + rng.normal(0, 4, 40), "falling": lambda: -x + rng.normal(0, 4, 40),
            "noise": lambda: rng.normal(0, 1, 40), "tiny": lambda: np.array([1.0, 3.0, 2.0, 4.0])}
    parts = []
    for i, kind in enumerate(ys):
        y = make[kind]()
        xs = x[: len(y)]
        c = spearman(xs, y, seed=i)
        rho, p = st.spearmanr(xs, y)
        assert (c.rho, c.p) == pytest.approx((rho, p), rel=1e-12)
        parts.append(directional(f"part {i}", c, +1))
    assert all_of("agree", "ρ", parts).verdict == expected
