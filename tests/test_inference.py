"""Known-answer tests of analysis/inference.py: each statistic is checked against a value computed here by hand or
by an independent route (SciPy, exact enumeration, the textbook formula), and on planted data whose structure must
decide the answer (a confound that only pooling sees, repeated units that only a cluster bootstrap sees)."""

import itertools
import math
import time

import numpy as np
import pytest
from scipy import stats as st

from mergeability.analysis.inference import (
    Trend,
    blocked_permutation_p,
    cluster_bootstrap,
    cluster_bootstrap_ci,
    clustered_slope,
    equivalent,
    holm,
    spearman_power,
    spearman_power_n,
    stratified_spearman,
)
from mergeability.analysis.stats import bootstrap_ci

# ------------------------------------------------------------------ stratified_spearman


def shifted_strata(seed: int, within: float, per: int = 40, strata: int = 5):
    """x and y both shifted by the stratum's level (a confound like the relation); `within` sets how much of x's
    within-stratum deviation y shares (0: independent within strata)."""
    rng = np.random.default_rng(seed)
    level = np.repeat(np.arange(strata) * 2.0, per)
    x = level + rng.normal(size=len(level))
    y = level + within * (x - level) + rng.normal(size=len(level))
    return x, y, np.repeat([f"rel{i}" for i in range(strata)], per)


def test_one_stratum_is_plain_spearman():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = 0.4 * x + rng.normal(size=40)
    r = stratified_spearman(x, y, None, n_perm=4000)
    rho, p = st.spearmanr(x, y)
    assert r.rho == pytest.approx(rho, abs=1e-12)
    assert (r.n, r.strata) == (40, 1)
    assert r.p == pytest.approx(p, abs=0.01)  # the permutation null against SciPy's t approximation
    assert r.ci[0] < r.rho < r.ci[1]


def test_rho_is_the_size_weighted_mean_over_usable_strata():
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=12), rng.normal(size=6)
    ya, yb = xa + rng.normal(size=12), -xb + rng.normal(size=6)
    x = [*xa, *xb, 1.0, 2.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0, math.nan, 4.0]
    y = [*ya, *yb, 1.0, 2.0, 1.0, 2.0, 3.0, 7.0, 7.0, 7.0, 1.0, 2.0]
    # c: two pairs only; d: no spread in x; e: no spread in y; f: a NaN pair dropped leaves one pair
    g = ["a"] * 12 + ["b"] * 6 + ["c"] * 2 + ["d"] * 3 + ["e"] * 3 + ["f"] * 2
    r = stratified_spearman(x, y, g)
    expected = (12 * st.spearmanr(xa, ya)[0] + 6 * st.spearmanr(xb, yb)[0]) / 18
    assert r.rho == pytest.approx(expected, abs=1e-12)
    assert (r.n, r.strata) == (18, 2)


def test_nothing_usable_is_nan():
    r = stratified_spearman([1.0, 2.0, math.nan, 3.0], [1.0, 2.0, 3.0, math.nan], ["a", "a", "a", "a"])
    assert math.isnan(r.rho) and math.isnan(r.p) and all(math.isnan(c) for c in r.ci)
    assert (r.n, r.strata) == (0, 0)
    assert math.isnan(stratified_spearman([], [], []).rho)


def test_relation_confound_is_not_a_correlation():
    x, y, g = shifted_strata(seed=1, within=0.0)
    assert st.spearmanr(x, y)[1] < 0.001  # pooled: strongly "significant", all from the shared shift
    r = stratified_spearman(x, y, g, n_perm=2000)
    assert r.p > 0.05 and r.ci[0] < 0 < r.ci[1]
    assert (r.n, r.strata) == (200, 5)


def test_a_relation_within_strata_is_found():
    x, y, g = shifted_strata(seed=0, within=0.6)
    rho, p = st.spearmanr(x, y)
    r = stratified_spearman(x, y, g, n_perm=2000)
    assert p < 0.01 and r.p < 0.01
    assert np.sign(r.rho) == np.sign(rho) == 1 and r.ci[0] > 0
    assert r.rho < rho  # the within-strata ρ has no share of the confound


def test_permutation_p_matches_exact_enumeration_within_strata():
    """Tied y values make a permutation across strata differ from one within them: the exact within-strata p here
    is 1/120 (all 5!·4! permutations enumerated); across strata it would be about a third of that."""
    xa, ya, xb, yb = [1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [1, 2, 3, 4], [10, 11, 12, 13]

    obs = (5 * st.spearmanr(xa, ya)[0] + 4 * st.spearmanr(xb, yb)[0]) / 9
    rho_a = [st.spearmanr(xa, perm)[0] for perm in itertools.permutations(ya)]
    rho_b = [st.spearmanr(xb, perm)[0] for perm in itertools.permutations(yb)]
    null = (5 * np.array(rho_a)[:, None] + 4 * np.array(rho_b)[None, :]) / 9  # every pair of permutations
    exact = float(np.mean(np.abs(null) >= abs(obs) - 1e-12))
    assert exact == pytest.approx(1 / 120)
    r = stratified_spearman(xa + xb, ya + yb, ["a"] * 5 + ["b"] * 4, n_perm=20000)
    assert r.rho == pytest.approx(obs, abs=1e-12)
    assert r.p == pytest.approx(exact, abs=0.002)  # Monte Carlo SE ≈ 0.0006


def test_perfect_relation_p_is_the_floor_and_the_bootstrap_keeps_strata():
    x = np.tile(np.arange(10.0), 2)
    up = stratified_spearman(x, x, [0] * 10 + [1] * 10, n_perm=500)
    assert up.rho == pytest.approx(1.0) and up.p == pytest.approx(1 / 501)  # no permutation reaches ρ = 1
    assert up.ci == pytest.approx((1.0, 1.0))
    # +1 in one stratum, −1 in the other, equal sizes: every stratified resample keeps both at their size → ρ = 0
    mixed = stratified_spearman(x, np.r_[np.arange(10.0), -np.arange(10.0)], [0] * 10 + [1] * 10, n_boot=300)
    assert mixed.rho == pytest.approx(0.0, abs=1e-12) and mixed.ci == pytest.approx((0.0, 0.0), abs=1e-12)


def test_deterministic_fast_and_checked():
    rng = np.random.default_rng(7)
    x = rng.normal(size=300)
    y = 0.1 * x + rng.normal(size=300)
    g = rng.integers(0, 10, 300)
    stratified_spearman(x[:30], y[:30], g[:30])  # warm-up: imports and caches are not the function's cost
    t0 = time.perf_counter()
    r = stratified_spearman(x, y, g)
    assert time.perf_counter() - t0 < 1.0
    assert r == stratified_spearman(x, y, g) and (r.n, r.strata) == (300, 10)
    assert stratified_spearman(x, y, g, seed=1).p != r.p
    with pytest.raises(ValueError):
        stratified_spearman(x, y, g[:-1])


# ------------------------------------------------------------------ holm


def test_holm_known_answer():
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max 0.02, 0.03, 0.06, 0.06
    adj = holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert adj[1] != adj[1]  # NaN passes through and does not count in m
    assert [adj[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 × 2 capped; 0.6 lifted to the running max
    assert holm([0.02]) == pytest.approx([0.02]) and holm([]) == []


@pytest.mark.parametrize("seed", range(20))
def test_holm_rejects_what_the_step_down_procedure_rejects(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 12))
    p = np.where(rng.random(m) < 0.5, rng.random(m) * 0.02, rng.random(m))
    adj = np.array(holm(p))
    alpha = 0.05
    rejected, order = set(), np.argsort(p)
    for j, i in enumerate(order):  # step down: reject while p_(j) ≤ α / (m − j), stop at the first failure
        if p[i] > alpha / (m - j):
            break
        rejected.add(int(i))
    assert set(np.flatnonzero(adj <= alpha).tolist()) == rejected
    assert np.all(adj >= p) and np.all(adj <= 1)
    assert np.all(np.diff(adj[order]) >= 0)  # monotone in the raw p


# ------------------------------------------------------------------ cluster bootstrap


def test_repeated_units_widen_the_cluster_ci():
    rng = np.random.default_rng(0)
    unit = np.repeat(np.arange(10), 20)
    values = rng.normal(size=10)[unit] + 0.01 * rng.normal(size=200)  # 10 units, each 20 near-identical rows
    lo, hi = cluster_bootstrap_ci(values, unit)
    rlo, rhi = bootstrap_ci(values)
    assert hi - lo > 3 * (rhi - rlo)  # the rows pretend to be 200 observations; they are 10
    assert lo < values.mean() < hi


def test_one_row_per_cluster_is_the_row_bootstrap():
    rng = np.random.default_rng(1)
    values = rng.exponential(size=60)
    labels = rng.permutation(60)  # one row per cluster, in no particular order
    lo, hi = cluster_bootstrap_ci(values, labels, n=4000)
    rlo, rhi = bootstrap_ci(values, n=4000)
    assert hi - lo == pytest.approx(rhi - rlo, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx((rlo + rhi) / 2, abs=0.05)


def test_drawn_clusters_come_whole():
    sizes = {"a": 3, "b": 5, "c": 7, "d": 2}
    clusters = np.array([c for c, k in sizes.items() for _ in range(k)])
    rng = np.random.default_rng(2)
    clusters = clusters[rng.permutation(len(clusters))]  # rows of one cluster need not be adjacent
    seen = []

    def whole(rows):  # 1.0 iff every cluster appears a whole number of times, each of its rows equally often
        counts = np.bincount(rows, minlength=len(clusters))
        seen.append(len(rows))
        return float(all(len(set(counts[clusters == c])) == 1 for c in sizes))

    assert cluster_bootstrap(whole, clusters, n=200) == (1.0, 1.0)
    assert len(seen) == 200 and len(set(seen)) > 1  # draws differ in total size: clusters differ in size


def test_cluster_bootstrap_edge_cases():
    assert all(math.isnan(c) for c in cluster_bootstrap_ci([1.0, 2.0, 3.0], ["u", "u", "u"]))
    assert all(math.isnan(c) for c in cluster_bootstrap_ci([], []))
    assert all(math.isnan(c) for c in cluster_bootstrap(lambda rows: math.nan, [0, 1, 2]))
    lo, hi = cluster_bootstrap_ci([1.0, 1.0, 5.0, 5.0], [0, 0, 1, 1], stat=np.median, n=200)
    assert 1.0 <= lo <= hi <= 5.0
    assert cluster_bootstrap_ci(np.arange(40.0), np.arange(40) // 4, seed=3) == \
        cluster_bootstrap_ci(np.arange(40.0), np.arange(40) // 4, seed=3)


# ------------------------------------------------------------------ power of a Spearman test


def hand_n(rho, alpha, power, spearman=True):
    z = st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power)
    return math.ceil(3 + (1 + rho**2 / 2 if spearman else 1) * (z / math.atanh(rho)) ** 2)


@pytest.mark.parametrize("rho, alpha, power", [(0.2, 0.05, 0.8), (0.3, 0.05, 0.8), (0.5, 0.01, 0.9), (0.1, 0.05, 0.8)])
def test_power_n_matches_the_formula(rho, alpha, power):
    assert spearman_power_n(rho, alpha, power) == hand_n(rho, alpha, power)
    assert spearman_power_n(-rho, alpha, power) == hand_n(rho, alpha, power)  # two-sided: the sign does not matter


def test_power_n_known_values_and_direction():
    assert hand_n(0.2, 0.05, 0.8, spearman=False) == 194  # the textbook Pearson value
    assert spearman_power_n(0.2) == 198  # 3 + 1.02 × (2.8016 / 0.2027)² = 197.8
    assert spearman_power_n(0.3) == 89
    assert spearman_power_n(0.1) > spearman_power_n(0.2) > spearman_power_n(0.3)
    assert spearman_power_n(0.2, power=0.9) > spearman_power_n(0.2, power=0.8)
    with pytest.raises(ValueError):
        spearman_power_n(0.0)


@pytest.mark.parametrize("rho", [0.15, 0.2, 0.3, -0.4])
def test_power_inverts_power_n(rho):
    n = spearman_power_n(rho)
    assert spearman_power(rho, n) >= 0.8 > spearman_power(rho, n - 1)


def test_power_known_values():
    # ρ = 0.3, n = 40: δ = atanh 0.3 / √(1.045 / 37) = 1.8335; power = Φ(δ − 1.96) + Φ(−δ − 1.96)
    delta = math.atanh(0.3) / math.sqrt((1 + 0.045) / 37)
    assert spearman_power(0.3, 40) == pytest.approx(st.norm.cdf(delta - 1.959964) + st.norm.cdf(-delta - 1.959964),
                                                    rel=1e-5)
    assert spearman_power(0.3, 40) == pytest.approx(0.4530, abs=1e-3)
    assert spearman_power(0.0, 50) == pytest.approx(0.05)  # no effect: the power is the level
    assert math.isnan(spearman_power(0.3, 3))


# ------------------------------------------------------------------ blocked_permutation_p


def test_blocked_permutation_exact_on_a_tiny_table():
    # two blocks, each one value per group: 2 × 2 within-block permutations, equally likely; the observed split
    # (group a high in both blocks) and the fully swapped one reach the observed statistic: p = 2/4
    p = blocked_permutation_p([1, 0, 1, 0], ["a", "b", "a", "b"], [0, 0, 1, 1], n_perm=20000, seed=0)
    assert p == pytest.approx(0.5, abs=0.02)


def test_blocked_permutation_detects_a_group_effect_and_ignores_block_levels():
    rng = np.random.default_rng(0)
    blocks = np.repeat(np.arange(4), 15)
    groups = np.tile(np.repeat(np.arange(5), 3), 4)
    level = np.array([0.0, 5.0, -5.0, 10.0])[blocks]  # huge differences between blocks, none between groups
    flat = level + rng.normal(0, 1, 60)
    assert blocked_permutation_p(flat, groups, blocks, seed=1) > 0.05
    assert blocked_permutation_p(flat + 0.8 * groups, groups, blocks, seed=1) < 0.01
    # the observed statistic is reached by itself: p ≥ 1 / (1 + n_perm)
    assert blocked_permutation_p(flat + 50 * groups, groups, blocks, n_perm=99) == pytest.approx(1 / 100)


def test_blocked_permutation_holds_its_level_under_the_null():
    rng = np.random.default_rng(2)
    blocks = np.repeat(np.arange(3), 12)
    groups = np.tile(np.repeat(np.arange(4), 3), 3)
    ps = [blocked_permutation_p((rng.random(36) < 0.6).astype(float), groups, blocks, n_perm=200, seed=i)
          for i in range(200)]
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.1


def test_blocked_permutation_needs_two_groups():
    assert math.isnan(blocked_permutation_p([1, 0, 1], [0, 0, 0], [0, 1, 2]))


# ------------------------------------------------------------------ clustered_slope and equivalent


def bins_by_unit(seed: int, units: int, slope: float, repeats: int = 2):
    """0/1 outcomes of `units` fixed updates at partner bins 0, ¼, …, 1; each update has its own base rate."""
    rng = np.random.default_rng(seed)
    unit = np.repeat(np.arange(units), 5 * repeats)
    x = np.tile(np.repeat(np.linspace(0, 1, 5), repeats), units)
    base = rng.uniform(0.2, 0.8 - slope, units) if slope > 0 else rng.uniform(0.1, 0.9, units)
    y = (rng.random(len(x)) < base[unit] + slope * x).astype(float)
    return x, y, unit


def test_slope_is_least_squares_and_nan_without_spread():
    x, y, unit = bins_by_unit(0, 20, 0.3)
    t = clustered_slope(x, y, unit, n_boot=200)
    assert t.slope == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-12)
    assert (t.n, t.clusters) == (200, 20)
    flat = clustered_slope([0.5] * 6, [0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 2, 2])
    assert math.isnan(flat.slope) and all(math.isnan(c) for c in flat.ci)
    assert clustered_slope([0, 1, math.nan], [0, 1, 1], ["a", "b", "c"]).n == 2


def test_flat_data_is_equivalent():
    x, y, unit = bins_by_unit(0, 120, 0.0)
    t = clustered_slope(x, y, unit)
    assert t.ci[0] < 0 < t.ci[1]
    assert equivalent(t, 0.2)


def test_planted_slope_is_not_equivalent():
    x, y, unit = bins_by_unit(2, 40, 0.5)
    t = clustered_slope(x, y, unit)
    assert t.ci[0] > 0 and t.ci[0] < 0.5 < t.ci[1]
    assert not equivalent(t, 0.2)


def test_tiny_noisy_data_is_not_equivalent():
    x, y, unit = bins_by_unit(3, 3, 0.0, repeats=1)
    t = clustered_slope(x, y, unit)
    assert t.ci[1] - t.ci[0] > 0.4 and not equivalent(t, 0.2)


def test_unit_level_trend_needs_the_cluster_ci():
    """x and y both fixed per unit: 200 rows are 10 observations, and only the cluster CI says so."""
    rng = np.random.default_rng(4)
    unit = np.repeat(np.arange(10), 20)
    x = rng.random(10)[unit]
    y = rng.normal(size=10)[unit] + 0.01 * rng.normal(size=200)
    t = clustered_slope(x, y, unit)
    rows = cluster_bootstrap(lambda r: np.polyfit(x[r], y[r], 1)[0], np.arange(200))
    assert t.ci[1] - t.ci[0] > 3 * (rows[1] - rows[0])


@pytest.mark.parametrize("ci, verdict", [
    ((-0.1, 0.1), True),
    ((-0.1, 0.3), False),  # the upper end is outside
    ((-0.3, 0.1), False),  # the lower end is outside
    ((-0.2, 0.1), False),  # strictly inside: the boundary is outside
    ((0.05, 0.15), True),  # excluding 0 does not stop equivalence: every allowed slope is small
    ((math.nan, math.nan), False),
])
def test_equivalent_is_the_ci_inside_the_margin(ci, verdict):
    assert equivalent(Trend(0.0, ci, 10, 5), 0.2) is verdict
