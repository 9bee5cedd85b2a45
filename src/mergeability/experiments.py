"""The paper's follow-up experiments over a finished run: each writes its own rows to the run's store (so it
resumes), and `collect` turns whatever rows exist into tables, figures and claim verdicts for the report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from rich.console import Console
from scipy import stats as st

from mergeability.analysis.claims import ALPHA, Verdict, directional
from mergeability.analysis.stats import assign_bins, spearman
from mergeability.config import TaskConfig
from mergeability.errors import MergeabilityError
from mergeability.estimate import merge_set_job, params_key, plan_trials, run_trials

NAMES = ("algorithms", "robustness", "locality", "groups")
REPEATS = 3  # random draws per setting of locality and groups
OTHER_METHODS = ("ties", "mean")


def _context(run_dir: Path, overrides: dict):
    """Config, prepared model/scorer, store, kept updates and items of a run."""
    from mergeability.pipelines import open_run_dir, prepare_popqa
    from mergeability.updates import load_update

    run_dir = Path(run_dir)
    cfg, store = open_run_dir(run_dir)
    if isinstance(cfg, TaskConfig):
        store.close()
        raise MergeabilityError(f"{run_dir} is a task-level run: its experiment is weighted "
                                f"(mergeability experiment weighted {run_dir})")
    kept = store.rows("SELECT item_id, path FROM updates WHERE kept = 1 ORDER BY item_id")
    if len(kept) <= cfg.partners:
        raise MergeabilityError(f"{run_dir} has {len(kept)} kept updates: finish the run first (--resume)")
    cfg = cfg.replace(**overrides)
    prep = prepare_popqa(cfg)
    by_id = {it.id: it for it in prep.items}
    updates = {r["item_id"]: load_update(run_dir / r["path"]) for r in kept if r["item_id"] in by_id}
    return cfg, prep, store, updates, by_id


def _trials(cfg, prep, store, updates, by_id, method, params, trials, partners, console, label):
    from mergeability.backends import pool_for
    from mergeability.pipelines import PopqaEvaluator, _progress

    pool = sorted(updates)
    plan = plan_trials(cfg.seed, pool, pool, trials, partners)
    key = params_key(method, {**params, "partners": partners})
    done = store.done_trials(method, key)
    with _progress(console) as progress:
        task = progress.add_task(label, total=len(plan), completed=sum((p.target, p.trial) in done for p in plan))

        def record(t, s):
            store.add_trial(dict(target=t.target, trial=t.trial, method=method, params=key, partners=list(t.partners),
                                 correct=int(s.correct), probs=s.probs))
            progress.advance(task)

        evaluate = PopqaEvaluator.build(prep.scorer, prep.items)
        with pool_for(cfg, PopqaEvaluator(cfg), evaluate, updates) as workers:
            run_trials(plan, updates, method, params, evaluate, record, done, chunk=cfg.batch_rows, pool=workers,
                       reference=cfg.engine == "plain")


def _main_scores(cfg, store, updates) -> dict[str, float]:
    from mergeability.pipelines import run_key, scores

    sc = scores(store, run_key(cfg), sorted(updates), cfg.trials, complete=True)
    if set(sc) != set(updates):
        raise MergeabilityError("the run's trials are not finished: --resume it first")
    return sc


def _by_bin(sc: dict[str, float], M: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for i in sorted(sc):
        out.setdefault(round(sc[i] * M), []).append(i)
    return out


def locality_units(cfg, sc: dict[str, float]) -> list[tuple[str, dict]]:
    """§5.1: up to 10 top-score updates, each merged with a partner group drawn from each score bin."""
    rng = random.Random(f"{cfg.seed}/locality")
    ranked = sorted(sc, key=lambda i: (-sc[i], i))
    fixed = ranked[: min(10, max(1, len(ranked) // 4))]
    units = []
    for k, members in sorted(_by_bin(sc, cfg.trials).items()):
        pool = [i for i in members if i not in fixed]
        if len(pool) < 2:
            continue
        for f in fixed:
            for rep in range(REPEATS):
                partners = rng.sample(pool, min(cfg.partners, len(pool)))
                spec = {"fixed": f, "bin": k / cfg.trials, "rep": rep, "merge": [f, *partners]}
                units.append((json.dumps(spec, sort_keys=True), spec))
    return units


def groups_units(cfg, sc: dict[str, float]) -> list[tuple[str, dict]]:
    """A.20-A.22: merge updates of one bin; mix lowest and highest; grow the merged set."""
    rng = random.Random(f"{cfg.seed}/groups")
    bins, units = _by_bin(sc, cfg.trials), []

    def add(kind, x, ids, rep):
        spec = {"kind": kind, "x": x, "rep": rep, "merge": sorted(ids)}
        units.append((json.dumps(spec, sort_keys=True), spec))

    size = min(10, cfg.partners + 1)
    for k, members in sorted(bins.items()):
        for rep in range(REPEATS):
            if len(members) >= 2:
                add("bin", k / cfg.trials, rng.sample(members, min(size, len(members))), rep)
            for n in (2, 4, 8, 16):
                if n <= len(members):
                    add(f"grow:{k / cfg.trials:.2f}", n, rng.sample(members, n), rep)
    ranked = sorted(sc, key=lambda i: (sc[i], i))
    L = min(size, len(ranked) // 2)
    low, high = ranked[:L], ranked[-L:]
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        for rep in range(REPEATS):
            h = round(frac * L)
            add("mix", frac, rng.sample(high, h) + rng.sample(low, L - h), rep)
    return units


def _run_units(name, units, cfg, prep, store, updates, by_id, console) -> None:
    from mergeability.backends import pool_for
    from mergeability.pipelines import PopqaEvaluator, _progress

    done = store.experiment_rows(name)
    todo = [(key, spec) for key, spec in units if key not in done]
    with _progress(console) as progress:
        task = progress.add_task(name, total=len(units), completed=len(units) - len(todo))
        evaluate = PopqaEvaluator.build(prep.scorer, prep.items)
        with pool_for(cfg, PopqaEvaluator(cfg), evaluate, updates) as workers:
            payloads = [(cfg.method, cfg.method_params, spec["merge"], None, cfg.engine == "plain")
                        for _, spec in todo]
            for i, res in workers.map(merge_set_job, payloads):
                correct = {m: int(r.correct) for m, r in zip(payloads[i][2], res)}
                store.add_experiment(name, todo[i][0], {"correct": correct})
                progress.advance(task)


def run_experiment(name: str, run_dir: Path, console: Console | None = None, overrides: dict | None = None) -> None:
    """Run experiment `name` on a finished run; `overrides` change how it runs (backend, workers), not what."""
    if name not in NAMES:
        raise MergeabilityError(f"unknown experiment {name!r}: choose one of {', '.join(NAMES)}, or weighted")
    console = console or Console()
    cfg, prep, store, updates, by_id = _context(run_dir, overrides or {})
    ctx = (cfg, prep, store, updates, by_id)
    if name == "algorithms":  # §5.2, A.9: the same trials (same partners) under other merge methods
        for method in OTHER_METHODS:
            if method != cfg.method:
                _trials(*ctx, method, {}, cfg.trials, cfg.partners, console, method)
    elif name == "robustness":  # A.3, A.13-14: twice the trials, and half the partners
        _trials(*ctx, cfg.method, cfg.method_params, 2 * cfg.trials, cfg.partners, console, f"M={2 * cfg.trials}")
        _trials(*ctx, cfg.method, cfg.method_params, cfg.trials, max(1, cfg.partners // 2), console,
                f"N={max(1, cfg.partners // 2)}")
    else:
        sc = _main_scores(cfg, store, updates)
        units = locality_units(cfg, sc) if name == "locality" else groups_units(cfg, sc)
        _run_units(name, units, cfg, prep, store, updates, by_id, console)
    store.close()


# ---------------------------------------------------------------------------------------------- report side


def collect(cfg, store, main: dict[str, float], figdir: Path) -> dict:
    """Tables, figures and claims of every experiment with rows in the store."""
    from mergeability.pipelines import run_key, scores
    from mergeability.report.build import Table
    from mergeability.report.figures import lines_figure

    out = {"tables": [], "figures": [], "claims": {}}
    M, N = cfg.trials, cfg.partners
    ids = sorted(main)
    bins = assign_bins([main[i] for i in ids], M)
    others = {}
    for method in OTHER_METHODS:
        if method == cfg.method:
            continue
        sc = scores(store, params_key(method, {"partners": N}), ids, M, complete=True)
        if set(ids) <= set(sc):
            others[method] = sc
    if others:
        methods = {cfg.method: main, **others}
        hist_rows = [[f"{k / M:.2f}"] + [str(sum(round(s[i] * M) == k for i in ids)) for s in methods.values()]
                     for k in range(M + 1)]
        out["tables"].append(Table("Score distribution by merge method (Fig. 6, A.31, A.33)", ["score", *methods],
                                   hist_rows))
        by_bin = {m: ([k / M for k in range(M + 1)],
                      [float(np.mean([s[i] for i, b in zip(ids, bins) if b == k])) if (bins == k).any() else math.nan
                       for k in range(M + 1)]) for m, s in methods.items()}
        out["tables"].append(Table(f"Mean score under each method per {cfg.method} score bin (A.35)",
                                   [f"{cfg.method} score", *methods],
                                   [[f"{x:.2f}"] + [f"{by_bin[m][1][j]:.3f}" for m in methods]
                                    for j, x in enumerate(by_bin[cfg.method][0])]))
        out["figures"].append((f"Mean score under other methods per {cfg.method} bin (A.35)",
                               lines_figure(by_bin, figdir / "algorithms.png", "Scores across merge methods",
                                            f"{cfg.method} mergeability score", "mean score under the method")))
        corrs = {m: spearman([main[i] for i in ids], [s[i] for i in ids], seed=cfg.seed) for m, s in others.items()}
        out["tables"].append(Table(f"Rank correlation with {cfg.method} scores", ["method", "ρ", "95% CI", "p"],
                                   [[m, f"{c.rho:.3f}", f"[{c.ci[0]:.2f}, {c.ci[1]:.2f}]", f"{c.p:.2g}"]
                                    for m, c in corrs.items()]))
        agree = [directional(f"{cfg.method} vs {m}", c, +1) for m, c in corrs.items()]
        out["claims"]["methods_agree"] = Verdict(
            "Scores agree across merge methods (A.9)", "; ".join(f"{v.claim}: {v.measured}" for v in agree),
            "; ".join(v.evidence for v in agree),
            "supported" if all(v.verdict == "supported" for v in agree)
            else "contradicted" if any(v.verdict == "contradicted" for v in agree) else "inconclusive")
        if "mean" in others:  # the weakest method: no conflict resolution at all
            a = np.array([main[i] == 1.0 for i in ids])
            b = np.array([others["mean"][i] == 1.0 for i in ids])
            more, fewer = int((b & ~a).sum()), int((a & ~b).sum())
            p = float(st.binomtest(more, more + fewer).pvalue) if more + fewer else math.nan
            verdict = ("supported" if more > fewer and p < ALPHA else
                       "contradicted" if fewer > more and p < ALPHA else "inconclusive")
            out["claims"]["weaker_methods"] = Verdict(
                "Weaker merge methods put more updates at score 1.0 (§5.2)",
                f"at 1.0: mean {b.mean():.0%} vs {cfg.method} {a.mean():.0%}",
                f"sign test on {more + fewer} discordant updates, p = {p:.2g}", verdict)
    _collect_locality(cfg, store, main, figdir, out)
    _collect_groups(cfg, store, main, figdir, out)
    twice = scores(store, run_key(cfg), ids, M, first=M, complete=True)
    half_n = max(1, N // 2)
    half = scores(store, run_key(cfg, half_n), ids, M, complete=True)
    if set(ids) <= set(twice) and set(ids) <= set(half):
        c_m = spearman([main[i] for i in ids], [twice[i] for i in ids], seed=cfg.seed)
        c_n = spearman([main[i] for i in ids], [half[i] for i in ids], seed=cfg.seed)
        out["tables"].append(Table("Robustness of scores to M and N (A.13, A.14)", ["comparison", "ρ", "95% CI", "p"],
                                   [[f"trials 1–{M} vs trials {M + 1}–{2 * M} (N={N})", f"{c_m.rho:.3f}",
                                     f"[{c_m.ci[0]:.2f}, {c_m.ci[1]:.2f}]", f"{c_m.p:.2g}"],
                                    [f"N={N} vs N={half_n} (M={M})", f"{c_n.rho:.3f}",
                                     f"[{c_n.ci[0]:.2f}, {c_n.ci[1]:.2f}]", f"{c_n.p:.2g}"]]))
        from mergeability.report.figures import lines_figure

        xs = [k / M for k in range(M + 1)]
        bins_main = {k: [i for i in ids if round(main[i] * M) == k] for k in range(M + 1)}
        avg = lambda s: [float(np.mean([s[i] for i in bins_main[k]])) if bins_main[k] else math.nan  # noqa: E731
                         for k in range(M + 1)]
        out["figures"].append(("Robustness to M and N (A.13, A.14)", lines_figure(
            {f"trials {M + 1}–{2 * M}": (xs, avg(twice)), f"N={half_n}": (xs, avg(half))}, figdir / "robustness.png",
            "Scores under other M and N, per main-run score bin", f"score (M={M}, N={N})", "mean score")))
        vs = [directional("M", c_m, +1), directional("N", c_n, +1)]
        out["claims"]["mn_agree"] = Verdict(
            "Scores agree across M and N (A.3)", f"ρ(M halves) = {c_m.rho:+.2f}; ρ(N vs N/2) = {c_n.rho:+.2f}",
            "; ".join(v.evidence for v in vs),
            "supported" if all(v.verdict == "supported" for v in vs)
            else "contradicted" if any(v.verdict == "contradicted" for v in vs) else "inconclusive")
    return out


def _complete(store, name: str, units) -> list[tuple[dict, dict]] | None:
    rows = store.experiment_rows(name)
    if not units or any(k not in rows for k, _ in units):
        return None
    return [(spec, rows[k]) for k, spec in units]


def _collect_locality(cfg, store, main, figdir, out) -> None:
    from mergeability.report.build import Table
    from mergeability.report.figures import lines_figure

    done = _complete(store, "locality", locality_units(cfg, main))
    if done is None:
        return
    per_bin: dict[float, tuple[list[int], list[float]]] = {}
    for spec, res in done:
        c = res["correct"]
        fixed_ok, partners = c[spec["fixed"]], [v for i, v in c.items() if i != spec["fixed"]]
        per_bin.setdefault(spec["bin"], ([], []))
        per_bin[spec["bin"]][0].append(fixed_ok)
        per_bin[spec["bin"]][1].append(float(np.mean(partners)))
    xs = sorted(per_bin)
    fixed_acc = [float(np.mean(per_bin[x][0])) for x in xs]
    partner_acc = [float(np.mean(per_bin[x][1])) for x in xs]
    out["tables"].append(Table("Locality: high-score updates merged with partners from each bin (§5.1, Fig. 5)",
                               ["partner bin", "merges", "fixed-set accuracy", "partner accuracy"],
                               [[f"{x:.2f}", str(len(per_bin[x][0])), f"{a:.3f}", f"{b:.3f}"]
                                for x, a, b in zip(xs, fixed_acc, partner_acc)]))
    out["figures"].append(("Locality (Fig. 5)", lines_figure(
        {"fixed high-score set": (xs, fixed_acc), "partners": (xs, partner_acc)}, figdir / "locality.png",
        "Accuracy after merging with partners from each score bin", "partners' mergeability score", "accuracy")))
    # Local if the fixed set's accuracy does not depend on the partners' bin, while the partners' does.
    table = [[sum(per_bin[x][0]), len(per_bin[x][0]) - sum(per_bin[x][0])] for x in xs]
    p = float(st.chi2_contingency(table)[1]) if len(xs) > 1 and np.all(np.array(table).sum(0) > 0) else 1.0
    spread = max(fixed_acc) - min(fixed_acc)
    verdict = ("supported" if p >= ALPHA and spread < 0.25 else "contradicted" if p < ALPHA and spread >= 0.25
               else "inconclusive")
    out["claims"]["locality"] = Verdict(
        "Mergeability is local: high-score updates stay stable whatever partners (§5.1)",
        f"fixed-set accuracy {min(fixed_acc):.2f}–{max(fixed_acc):.2f} across partner bins; "
        f"partners {min(partner_acc):.2f}–{max(partner_acc):.2f}",
        f"χ² test of fixed-set accuracy vs partner bin, p = {p:.2g} (rule: supported if p ≥ {ALPHA} and spread < 0.25)",
        verdict)


def _collect_groups(cfg, store, main, figdir, out) -> None:
    from mergeability.report.build import Table
    from mergeability.report.figures import lines_figure

    done = _complete(store, "groups", groups_units(cfg, main))
    if done is None:
        return
    acc: dict[tuple[str, float], list[float]] = {}
    for spec, res in done:
        acc.setdefault((spec["kind"], spec["x"]), []).append(float(np.mean(list(res["correct"].values()))))
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    bins = sorted(x for kind, x in mean if kind == "bin")
    mix = sorted(x for kind, x in mean if kind == "mix")
    out["tables"].append(Table("Accuracy when merging updates of one score bin (A.20)", ["bin", "accuracy"],
                               [[f"{x:.2f}", f"{mean[('bin', x)]:.3f}"] for x in bins]))
    out["tables"].append(Table("Accuracy when mixing lowest- and highest-score updates (A.21)",
                               ["share of high-score updates", "accuracy"],
                               [[f"{x:.0%}", f"{mean[('mix', x)]:.3f}"] for x in mix]))
    grow = {kind.split(":")[1]: sorted(x for k2, x in mean if k2 == kind) for kind, _ in mean if kind.startswith("grow")}
    series = {f"bin {b}": (xs, [mean[(f"grow:{b}", x)] for x in xs]) for b, xs in sorted(grow.items())}
    out["tables"].append(Table("Accuracy as the number of merged updates grows (A.22)", ["bin", "merged", "accuracy"],
                               [[b, str(x), f"{y:.3f}"] for b, (xs, ys) in series.items() for x, y in zip(xs, ys)]))
    out["figures"].append(("Merging within one bin, mixing, growing (A.20–A.22)", lines_figure(
        {"one bin (x = bin)": (bins, [mean[("bin", x)] for x in bins]),
         "mix (x = share of high)": (mix, [mean[("mix", x)] for x in mix])}, figdir / "groups.png",
        "Accuracy of merged groups", "bin score / share of high-score updates", "accuracy")))
    if series:
        out["figures"].append(("Accuracy as merged groups grow (A.22)", lines_figure(
            series, figdir / "groups_grow.png", "Accuracy as the merged group grows", "updates merged", "accuracy")))
