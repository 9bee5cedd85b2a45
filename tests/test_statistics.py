"""Known-answer tests of the follow-up experiments' statistics (analysis/experiments.py): the sign test and the
task-level retention. For each, data whose structure must decide "supported", the opposite structure
"contradicted", and noisy or too-small data "inconclusive"; p-values are checked against SciPy (or the closed
form) computed here, independently."""

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from mergeability.analysis.claims import decide
from mergeability.analysis.experiments import retention_changes, sign_test
from mergeability.analysis.stats import bootstrap_ci
from mergeability.experiments import weighted
from mergeability.report.experiments import weaker_methods_claim
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
    (v,) = decide([weaker_methods_claim("knots", own, mean)])
    assert v.verdict == verdict
    assert f"{more + fewer} discordant" in v.evidence


def test_sign_test_known_p_and_symmetry():
    a, b = paired(20, 0)
    assert sign_test(a, b).p == pytest.approx(2 * 0.5**20, rel=1e-12)
    flipped = sign_test(b, a)  # swapping A and B swaps more and fewer, never the p-value
    assert (flipped.more, flipped.fewer) == (0, 20) and flipped.p == sign_test(a, b).p


# ------------------------------------------------------------------ retention_changes (§6, Fig. 7)

TASKS = {f"t{k}": dict(base_acc=0.05 + 0.1 * k, ft_acc=(0.8, 0.5)[k % 2]) for k in range(8)}  # t0..t3 weak
SPEC = weighted.Weighted(sets=8, low=2, high=2, temperature=0.5, sweep=(2.0,), methods=("mean", "ties"))


def retention_run(tmp_path, weak_delta, strong_delta):
    """A real store holding every unit of the weighted experiment on TASKS: each task's accuracy after the plain
    merge is its base accuracy; after a weighted merge of set s it moves by weak_delta(s) or strong_delta(s).
    Returns (store, the expected change in retained accuracy per (method, T)). The verdicts, with the gates they
    need, are tests/test_weighted.py's."""
    store = Store(tmp_path / "results.sqlite")
    for name, row in TASKS.items():
        store.add_task(dict(name=name, path=f"tasks/{name}", **row))
    sets = weighted.task_sets([f"t{k}" for k in range(4)], [f"t{k}" for k in range(4, 8)], SPEC, seed=0)
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
    return store, expected


@pytest.mark.parametrize("name, weak, strong", [
    ("weak gain, strong kept", lambda s: 0.2, lambda s: -0.02),
    ("weak lose", lambda s: -0.2, lambda s: 0.1),
    ("noise", lambda s: (0.15, -0.15)[s % 2], lambda s: 0.0),
])
def test_retention_changes(tmp_path, name, weak, strong):
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
        # each value knows its task (tasks recur across sets: CIs cluster by them) and its set (the paired unit)
        assert r.weak_sets == sorted(r.weak_sets) and set(r.weak_sets) == set(range(SPEC.sets))
        assert len(r.weak_tasks) == len(r.weak) and set(r.weak_tasks) <= set(tasks)


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
