"""The report's sections for the example-level experiments: whatever rows the store holds become tables,
figures and claim verdicts. An experiment with missing rows adds nothing (its claims stay "not run")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mergeability import run
from mergeability.analysis.claims import ALPHA, Verdict, all_of, directional
from mergeability.analysis.experiments import locality_test, sign_test
from mergeability.analysis.stats import assign_bins, spearman
from mergeability.estimate import params_key
from mergeability.experiments import algorithms, groups, locality
from mergeability.experiments.robustness import half
from mergeability.report.document import Sections, Table
from mergeability.report.figures import lines_figure


def experiment_sections(cfg, store, main: dict[str, float], figdir: Path) -> Sections:
    """Every experiment's section, in a fixed order."""
    out = Sections()
    for section in (algorithms_section, locality_section, groups_section, robustness_section):
        out.extend(section(cfg, store, main, figdir))
    return out


def _corr_row(label: str, c) -> list[str]:
    return [label, f"{c.rho:.3f}", f"[{c.ci[0]:.2f}, {c.ci[1]:.2f}]", f"{c.p:.2g}"]


def _bin_means(scores: dict[str, float], ids: list[str], bins, M: int) -> list[float]:
    """Mean of `scores` over the updates of each main-run bin k = 0 … M (nan where a bin is empty)."""
    return [float(np.mean([scores[i] for i, b in zip(ids, bins) if b == k])) if (bins == k).any() else math.nan
            for k in range(M + 1)]


def algorithms_section(cfg, store, main, figdir) -> Sections:
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
    corrs = {m: spearman([main[i] for i in ids], [s[i] for i in ids], seed=cfg.seed) for m, s in others.items()}
    out.tables.append(Table(f"Rank correlation with {own} scores", ["method", "ρ", "95% CI", "p"],
                            [_corr_row(m, c) for m, c in corrs.items()]))
    agree = [directional(f"{own} vs {m}", c, +1) for m, c in corrs.items()]
    out.claims["methods_agree"] = all_of("Scores agree across merge methods (A.9)",
                                         "; ".join(f"{v.claim}: {v.measured}" for v in agree), agree)
    if "mean" in others:  # the weakest method: no conflict resolution at all
        out.claims["weaker_methods"] = weaker_methods_claim(own, [main[i] == 1.0 for i in ids],
                                                            [others["mean"][i] == 1.0 for i in ids])
    return out


def weaker_methods_claim(own: str, own_top: list[bool], mean_top: list[bool]) -> Verdict:
    t = sign_test(own_top, mean_top)
    verdict = ("supported" if t.more > t.fewer and t.p < ALPHA else
               "contradicted" if t.fewer > t.more and t.p < ALPHA else "inconclusive")
    return Verdict("Weaker merge methods put more updates at score 1.0 (§5.2)",
                   f"at 1.0: mean {np.mean(mean_top):.0%} vs {own} {np.mean(own_top):.0%}",
                   f"sign test on {t.more + t.fewer} discordant updates, p = {t.p:.2g}", verdict)


def _complete(store, name: str, units) -> list[tuple[dict, dict]] | None:
    rows = store.experiment_rows(name)
    if not units or any(k not in rows for k, _ in units):
        return None
    return [(spec, rows[k]) for k, spec in units]


def locality_section(cfg, store, main, figdir) -> Sections:
    """§5.1, Fig. 5: the fixed high-score updates' accuracy and the partners' across partner bins."""
    out = Sections()
    done = _complete(store, "locality", locality.units(cfg, main))
    if done is None:
        return out
    fixed: dict[float, list[int]] = {}
    partners: dict[float, list[float]] = {}
    for spec, res in done:
        c = res["correct"]
        fixed.setdefault(spec["bin"], []).append(c[spec["fixed"]])
        partners.setdefault(spec["bin"], []).append(float(np.mean([v for i, v in c.items() if i != spec["fixed"]])))
    xs = sorted(fixed)
    fixed_acc = [float(np.mean(fixed[x])) for x in xs]
    partner_acc = [float(np.mean(partners[x])) for x in xs]
    out.tables.append(Table("Locality: high-score updates merged with partners from each bin (§5.1, Fig. 5)",
                            ["partner bin", "merges", "fixed-set accuracy", "partner accuracy"],
                            [[f"{x:.2f}", str(len(fixed[x])), f"{a:.3f}", f"{b:.3f}"]
                             for x, a, b in zip(xs, fixed_acc, partner_acc)]))
    out.figures.append(("Locality (Fig. 5)", lines_figure(
        {"fixed high-score set": (xs, fixed_acc), "partners": (xs, partner_acc)}, figdir / "locality.png",
        "Accuracy after merging with partners from each score bin", "partners' mergeability score", "accuracy")))
    # Local if the fixed set's accuracy does not depend on the partners' bin, while the partners' does.
    t = locality_test(fixed)
    verdict = ("supported" if t.p >= ALPHA and t.spread < 0.25 else
               "contradicted" if t.p < ALPHA and t.spread >= 0.25 else "inconclusive")
    out.claims["locality"] = Verdict(
        "Mergeability is local: high-score updates stay stable whatever partners (§5.1)",
        f"fixed-set accuracy {min(fixed_acc):.2f}–{max(fixed_acc):.2f} across partner bins; "
        f"partners {min(partner_acc):.2f}–{max(partner_acc):.2f}",
        f"χ² test of fixed-set accuracy vs partner bin, p = {t.p:.2g} "
        f"(rule: supported if p ≥ {ALPHA} and spread < 0.25)",
        verdict)
    return out


def groups_section(cfg, store, main, figdir) -> Sections:
    """A.20-A.22: merging within one bin, mixing low and high, growing the merged set."""
    out = Sections()
    done = _complete(store, "groups", groups.units(cfg, main))
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


def robustness_section(cfg, store, main, figdir) -> Sections:
    """A.3, A.13-A.14: the scores of trials M+1 … 2M, and of N/2 partners, against the run's."""
    out, M, N = Sections(), cfg.merge.trials, cfg.merge.partners
    ids = sorted(main)
    twice = run.scores(store, run.run_key(cfg), ids, M, first=M, complete=True)
    halved = run.scores(store, run.run_key(cfg, half(N)), ids, M, complete=True)
    if not (set(ids) <= set(twice) and set(ids) <= set(halved)):
        return out
    c_m = spearman([main[i] for i in ids], [twice[i] for i in ids], seed=cfg.seed)
    c_n = spearman([main[i] for i in ids], [halved[i] for i in ids], seed=cfg.seed)
    out.tables.append(Table("Robustness of scores to M and N (A.13, A.14)", ["comparison", "ρ", "95% CI", "p"],
                            [_corr_row(f"trials 1–{M} vs trials {M + 1}–{2 * M} (N={N})", c_m),
                             _corr_row(f"N={N} vs N={half(N)} (M={M})", c_n)]))
    bins = assign_bins([main[i] for i in ids], M)
    xs = [k / M for k in range(M + 1)]
    out.figures.append(("Robustness to M and N (A.13, A.14)", lines_figure(
        {f"trials {M + 1}–{2 * M}": (xs, _bin_means(twice, ids, bins, M)),
         f"N={half(N)}": (xs, _bin_means(halved, ids, bins, M))}, figdir / "robustness.png",
        "Scores under other M and N, per main-run score bin", f"score (M={M}, N={N})", "mean score")))
    out.claims["mn_agree"] = all_of("Scores agree across M and N (A.3)",
                                    f"ρ(M halves) = {c_m.rho:+.2f}; ρ(N vs N/2) = {c_n.rho:+.2f}",
                                    [directional("M", c_m, +1), directional("N", c_n, +1)])
    return out
