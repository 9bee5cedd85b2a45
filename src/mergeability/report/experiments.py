"""The report's sections for the example-level experiments: whatever rows the store holds become tables,
figures and claim verdicts. An experiment with missing rows adds nothing (its claims stay "not run")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mergeability import run
from mergeability.analysis.claims import (
    EXPERIMENT_CLAIMS,
    AllOf,
    Directional,
    Local,
    NoEffect,
    Paired,
    correlate,
)
from mergeability.analysis.experiments import locality_stats, sign_test
from mergeability.analysis.stats import assign_bins
from mergeability.estimate import params_key
from mergeability.experiments import algorithms, groups, locality, robustness
from mergeability.report.document import Sections, Table
from mergeability.report.figures import lines_figure


def experiment_sections(cfg, store, main: dict[str, float], figdir: Path, data: dict) -> Sections:
    """Every experiment's section, in a fixed order. `data`: the run's features (analysis.features), whose
    'relation' column stratifies the tests."""
    out = Sections()
    for section in (algorithms_section, locality_section, groups_section, robustness_section):
        out.extend(section(cfg, store, main, figdir, data))
    return out


def _corr_row(label: str, c) -> list[str]:
    w = c.within
    return [label, f"{c.pooled.rho:.3f}", f"{w.rho:.3f}", f"[{w.ci[0]:.2f}, {w.ci[1]:.2f}]", f"{w.p:.2g}"]


CORR_COLUMNS = ["comparison", "ρ pooled", "ρ within relation", "95% CI (within)", "p (within, raw)"]


def _aligned(scores: dict[str, float], data: dict) -> np.ndarray:
    """`scores` in the order of `data['id']`."""
    return np.array([scores[i] for i in data["id"]], dtype=float)


def _groups(data: dict) -> dict[str, str]:
    """Update id -> subject: the groups the experiments kept apart when they drew their merge sets."""
    return {str(i): str(g) for i, g in zip(data["id"], data["subject"])}


def _corr(label: str, a: dict[str, float], b: dict[str, float], data: dict, seed: int):
    return correlate(label, _aligned(a, data), _aligned(b, data), data["relation"], seed=seed)


def _restrict(data: dict, keep) -> dict:
    """`data`'s columns on the updates in `keep` only."""
    mask = np.isin(np.asarray(data["id"]).astype(str), [str(i) for i in keep])
    return {k: np.asarray(v)[mask] for k, v in data.items()}


def _on(scores: dict, ids: list[str]) -> str:
    """", on n of m updates" where `scores` covers a sample of the run's updates, else ""."""
    return "" if len(scores) >= len(ids) else f", on {len(scores)} of {len(ids)} updates"


def _bin_means(scores: dict[str, float], ids: list[str], bins, M: int) -> list[float]:
    """Mean of `scores` over the updates of each main-run bin k = 0 … M that it scored (nan where none)."""
    means = []
    for k in range(M + 1):
        vals = [scores[i] for i, b in zip(ids, bins) if b == k and i in scores]
        means.append(float(np.mean(vals)) if vals else math.nan)
    return means


def algorithms_section(cfg, store, main, figdir, data) -> Sections:
    """§5.2, A.9, A.31-A.35: score distributions and agreement across merge methods."""
    out, M, N, own = Sections(), cfg.merge.trials, cfg.merge.partners, cfg.merge.method
    ids = sorted(main)
    others = {}
    for method in (m for m in algorithms.Algorithms.methods if m != own):
        sc = run.scores(store, params_key(method, {"partners": N}), ids, M, complete=True)
        if set(ids) <= set(sc):
            others[method] = sc
    if not others:
        return out
    methods = {own: main, **others}
    out.tables.append(Table("Score distribution by merge method (Fig. 6, A.31, A.33)", ["score", *methods],
                            [[f"{k / M:.2f}"] + [str(sum(round(s[i] * M) == k for i in ids)) for s in methods.values()]
                             for k in range(M + 1)]))
    bins = assign_bins([main[i] for i in ids], M)
    xs = [k / M for k in range(M + 1)]
    by_bin = {m: (xs, _bin_means(s, ids, bins, M)) for m, s in methods.items()}
    out.tables.append(Table(f"Mean score under each method per {own} score bin (A.35)", [f"{own} score", *methods],
                            [[f"{x:.2f}"] + [f"{by_bin[m][1][j]:.3f}" for m in methods] for j, x in enumerate(xs)]))
    out.figures.append((f"Mean score under other methods per {own} bin (A.35)",
                        lines_figure(by_bin, figdir / "algorithms.png", "Scores across merge methods",
                                     f"{own} mergeability score", "mean score under the method")))
    corrs = {m: _corr(f"{own} vs {m}", main, s, data, cfg.seed) for m, s in others.items()}
    out.tables.append(Table(f"Rank correlation with {own} scores", CORR_COLUMNS,
                            [_corr_row(m, c) for m, c in corrs.items()]))
    out.claims.update(algorithms_claims(cfg, methods, corrs, data))
    return out


def algorithms_claims(cfg, methods: dict[str, dict], corrs: dict, data: dict) -> dict:
    """The claims the other methods' scores decide, undecided: agreement (A.9), the weaker methods' share at 1.0
    and TIES's place between mean and KnOTS (§5.2), the gap trend under TIES and under mean (A.9)."""
    own, ids = cfg.merge.method, sorted(methods[cfg.merge.method])
    text = {k: t for k, (t, _) in EXPERIMENT_CLAIMS.items()}
    out = {"methods_agree": AllOf(text["methods_agree"], tuple(Directional(c.label, c, +1) for c in corrs.values()))}
    top = {m: [s[i] == 1.0 for i in ids] for m, s in methods.items()}
    if "mean" in methods and own != "mean":  # the weakest method: no conflict resolution at all
        out["weaker_methods"] = weaker_methods_claim(own, top[own], top["mean"])
    if {"mean", "ties", "knots"} <= set(methods):
        middle = {m: [0 < s[i] < 1 for i in ids] for m, s in methods.items()}
        out["ties_between"] = AllOf(text["ties_between"], (
            _paired("more at 1.0 under TIES than KnOTS", ("KnOTS", top["knots"]), ("TIES", top["ties"])),
            _paired("more at 1.0 under mean than TIES", ("TIES", top["ties"]), ("mean", top["mean"])),
            # bimodal: the mass leaves the middle bins for the ends (A.9), paired against KnOTS update by update
            _paired("fewer in the middle bins under mean than KnOTS", ("mean", middle["mean"]),
                    ("KnOTS", middle["knots"]))))
    if {"mean", "ties"} <= set(methods):
        gap = {i: g for i, g in zip(data["id"], data["gap"])}
        out["gap_by_method"] = AllOf(text["gap_by_method"], (
            Directional("under TIES", _corr("gap", gap, methods["ties"], data, cfg.seed), -1),
            NoEffect("under mean", (_corr("gap", gap, methods["mean"], data, cfg.seed),))))
    return out


def _paired(label: str, a: tuple[str, list[bool]], b: tuple[str, list[bool]]) -> Paired:
    """The claim that B holds for more updates than A (each a (name, per-update flags))."""
    t = sign_test(a[1], b[1])
    return Paired(label, f"{b[0]} {np.mean(b[1]):.0%} vs {a[0]} {np.mean(a[1]):.0%}", t.more, t.fewer, t.p)


def weaker_methods_claim(own: str, own_top: list[bool], mean_top: list[bool]) -> Paired:
    return _paired(EXPERIMENT_CLAIMS["weaker_methods"][0], (own, own_top), ("mean", mean_top))


def _complete(store, name: str, units) -> list[tuple[dict, dict]] | None:
    rows = store.experiment_rows(name)
    if not units or any(k not in rows for k, _ in units):
        return None
    return [(spec, rows[k]) for k, spec in units]


def locality_section(cfg, store, main, figdir, data) -> Sections:
    """§5.1, Fig. 5: the fixed high-score sets' accuracy and the partners' across partner bins, once the experiment
    has recorded every merge it plans."""
    out = Sections()
    done = _complete(store, "locality", locality.units(cfg, main, _groups(data)))
    if done is None:
        return out
    t = locality_stats(done, seed=cfg.seed)
    out.tables.append(Table("Locality: fixed sets of top-score updates merged with partners from each bin "
                            "(§5.1, Fig. 5)", ["partner bin", "merges", "fixed-set accuracy", "partner accuracy"],
                            [[f"{x:.2f}", str(n), f"{a:.3f}", f"{b:.3f}"]
                             for x, n, a, b in zip(t.bins, t.merges, t.fixed_acc, t.partner_acc)]))
    out.figures.append(("Locality (Fig. 5)", lines_figure(
        {"fixed high-score sets": (t.bins, t.fixed_acc), "partners": (t.bins, t.partner_acc)},
        figdir / "locality.png", "Accuracy after merging with partners from each score bin",
        "partners' mergeability score", "accuracy")))
    text = {k: v for k, (v, _) in EXPERIMENT_CLAIMS.items()}
    out.claims["locality"] = Local(text["locality"], f"fixed-set accuracy {min(t.fixed_acc):.2f}–"
                                   f"{max(t.fixed_acc):.2f} across partner bins; partners {min(t.partner_acc):.2f}–"
                                   f"{max(t.partner_acc):.2f}", t.trend, t.p, t.spread, tuple(t.merges))
    partner_ids = sorted(t.partner_mean)
    rel = dict(zip(data["id"], data["relation"]))
    out.claims["partners_trend"] = Directional(text["partners_trend"], correlate(
        "partners", [main[i] for i in partner_ids], [t.partner_mean[i] for i in partner_ids],
        [rel[i] for i in partner_ids], seed=cfg.seed), +1)
    return out


def groups_section(cfg, store, main, figdir, data) -> Sections:
    """A.20-A.22: merging within one bin, mixing low and high, growing the merged set."""
    out = Sections()
    done = _complete(store, "groups", groups.units(cfg, main, _groups(data)))
    if done is None:
        return out
    acc: dict[tuple[str, float], list[float]] = {}
    for spec, res in done:
        acc.setdefault((spec["kind"], spec["x"]), []).append(float(np.mean(list(res["correct"].values()))))
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    bins = sorted(x for kind, x in mean if kind == "bin")
    mix = sorted(x for kind, x in mean if kind == "mix")
    out.tables.append(Table("Accuracy when merging updates of one score bin (A.20)", ["bin", "accuracy"],
                            [[f"{x:.2f}", f"{mean[('bin', x)]:.3f}"] for x in bins]))
    out.tables.append(Table("Accuracy when mixing lowest- and highest-score updates (A.21)",
                            ["share of high-score updates", "accuracy"],
                            [[f"{x:.0%}", f"{mean[('mix', x)]:.3f}"] for x in mix]))
    grow = {kind.split(":")[1]: sorted(x for k2, x in mean if k2 == kind)
            for kind, _ in mean if kind.startswith("grow")}
    series = {f"bin {b}": (xs, [mean[(f"grow:{b}", x)] for x in xs]) for b, xs in sorted(grow.items())}
    out.tables.append(Table("Accuracy as the number of merged updates grows (A.22)", ["bin", "merged", "accuracy"],
                            [[b, str(x), f"{y:.3f}"] for b, (xs, ys) in series.items() for x, y in zip(xs, ys)]))
    out.figures.append(("Merging within one bin, mixing, growing (A.20–A.22)", lines_figure(
        {"one bin (x = bin)": (bins, [mean[("bin", x)] for x in bins]),
         "mix (x = share of high)": (mix, [mean[("mix", x)] for x in mix])}, figdir / "groups.png",
        "Accuracy of merged groups", "bin score / share of high-score updates", "accuracy")))
    if series:
        out.figures.append(("Accuracy as merged groups grow (A.22)", lines_figure(
            series, figdir / "groups_grow.png", "Accuracy as the merged group grows", "updates merged", "accuracy")))
    return out


def other_partner_counts(cfg, store) -> list[int]:
    """The N values besides the run's own that the store holds trials for under the run's method and parameters."""
    own = json.loads(run.run_key(cfg))
    out = []
    for key in store.trial_keys():
        k = json.loads(key)
        n = k.pop("partners", None)
        if n not in (None, cfg.merge.partners) and k == {a: b for a, b in own.items() if a != "partners"}:
            out.append(n)
    return sorted(out)


def robustness_section(cfg, store, main, figdir, data) -> Sections:
    """A.3, A.13-A.14: the scores of trials M+1 … 2M, and at other N, against the run's."""
    out, M, N = Sections(), cfg.merge.trials, cfg.merge.partners
    ids = sorted(main)
    enough = lambda s: len(s) >= min(len(ids), robustness.MIN_SCORED)
    twice = run.scores(store, run.run_key(cfg), ids, M, first=M, complete=True)
    others = {n: run.scores(store, run.run_key(cfg, n), ids, M, complete=True)
              for n in other_partner_counts(cfg, store)}
    # M and N may be scored on a sample of the updates (Robustness.scored): compared on the updates they scored
    others = {n: s for n, s in others.items() if enough(s)}
    if not enough(twice) or not others:
        return out
    corrs = {f"trials 1–{M} vs trials {M + 1}–{2 * M} (N={N}{_on(twice, ids)})":
             _corr("M", main, twice, _restrict(data, twice), cfg.seed)}
    corrs.update({f"N={N} vs N={n} (M={M}{_on(s, ids)})": _corr(f"N={n}", main, s, _restrict(data, s), cfg.seed)
                  for n, s in others.items()})
    out.tables.append(Table("Robustness of scores to M and N (A.13, A.14)", CORR_COLUMNS,
                            [_corr_row(label, c) for label, c in corrs.items()]))
    bins = assign_bins([main[i] for i in ids], M)
    xs = [k / M for k in range(M + 1)]
    series = {f"trials {M + 1}–{2 * M}": (xs, _bin_means(twice, ids, bins, M))}
    series.update({f"N={n}": (xs, _bin_means(s, ids, bins, M)) for n, s in others.items()})
    out.figures.append(("Robustness to M and N (A.13, A.14)", lines_figure(
        series, figdir / "robustness.png", "Scores under other M and N, per main-run score bin",
        f"score (M={M}, N={N})", "mean score")))
    out.claims["mn_agree"] = AllOf(EXPERIMENT_CLAIMS["mn_agree"][0],
                                   tuple(Directional(c.label, c, +1) for c in corrs.values()))
    return out
