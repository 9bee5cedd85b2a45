"""The paper's follow-up experiments over a finished run: each writes its own rows to the run's store (so it
resumes), and `collect` turns whatever rows exist into tables, figures and claim verdicts for the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.console import Console
from scipy import stats as st

from mergeability.analysis.claims import ALPHA, Verdict, directional
from mergeability.analysis.stats import assign_bins, spearman
from mergeability.errors import MergeabilityError
from mergeability.estimate import params_key, plan_trials, run_trials

NAMES = ("algorithms", "robustness")
OTHER_METHODS = ("ties", "mean")


def _context(run_dir: Path):
    """Config, prepared model/scorer, store, kept updates and items of a run."""
    from mergeability.config import load_config
    from mergeability.pipelines import prepare_popqa
    from mergeability.store import Store
    from mergeability.updates import load_update

    run_dir = Path(run_dir)
    if not (run_dir / "results.sqlite").exists() or not (run_dir / "config.yaml").exists():
        raise MergeabilityError(f"{run_dir} is not a run directory: it has no results.sqlite and config.yaml")
    cfg = load_config(run_dir / "config.yaml")
    store = Store(run_dir / "results.sqlite")
    kept = store.rows("SELECT item_id, path FROM updates WHERE kept = 1 ORDER BY item_id")
    if len(kept) <= cfg.partners:
        raise MergeabilityError(f"{run_dir} has {len(kept)} kept updates: finish the run first (--resume)")
    prep = prepare_popqa(cfg)
    by_id = {it.id: it for it in prep.items}
    updates = {r["item_id"]: load_update(run_dir / r["path"]) for r in kept if r["item_id"] in by_id}
    return cfg, prep, store, updates, by_id


def _trials(cfg, prep, store, updates, by_id, method, params, trials, partners, console, label):
    from mergeability.pipelines import _progress

    pool = sorted(updates)
    plan = plan_trials(cfg.seed, pool, pool, trials, partners)
    key = params_key(method, {**params, "partners": partners})
    done = store.done_trials(method, key)
    with _progress(console) as progress:
        task = progress.add_task(label, total=len(plan), completed=sum((p.target, p.trial) in done for p in plan))

        def evaluate(batch, merged):
            return prep.scorer.score([(by_id[t.target], m) for t, m in zip(batch, merged)])

        def record(t, s):
            store.add_trial(dict(target=t.target, trial=t.trial, method=method, params=key, partners=list(t.partners),
                                 correct=int(s.correct), probs=s.probs))
            progress.advance(task)

        run_trials(plan, updates, method, params, evaluate, record, done, chunk=cfg.batch_rows)


def run_experiment(name: str, run_dir: Path, console: Console | None = None) -> None:
    if name not in NAMES:
        raise MergeabilityError(f"unknown experiment {name!r}: choose one of {', '.join(NAMES)}")
    console = console or Console()
    cfg, prep, store, updates, by_id = _context(run_dir)
    ctx = (cfg, prep, store, updates, by_id)
    if name == "algorithms":  # §5.2, A.9: the same trials (same partners) under other merge methods
        for method in OTHER_METHODS:
            if method != cfg.method:
                _trials(*ctx, method, {}, cfg.trials, cfg.partners, console, method)
    elif name == "robustness":  # A.3, A.13-14: twice the trials, and half the partners
        _trials(*ctx, cfg.method, cfg.method_params, 2 * cfg.trials, cfg.partners, console, f"M={2 * cfg.trials}")
        _trials(*ctx, cfg.method, cfg.method_params, cfg.trials, max(1, cfg.partners // 2), console,
                f"N={max(1, cfg.partners // 2)}")
    store.close()


# ---------------------------------------------------------------------------------------------- report side


def _scores(store, method: str, key: str, trials: range) -> dict[str, float]:
    rows = store.rows("SELECT target, trial, correct FROM trials WHERE method = ? AND params = ?", (method, key))
    acc: dict[str, list[int]] = {}
    for r in rows:
        if r["trial"] in trials:
            acc.setdefault(r["target"], []).append(r["correct"])
    return {t: sum(v) / len(v) for t, v in acc.items() if len(v) == len(trials)}


def collect(cfg, store, main: dict[str, float], figdir: Path) -> dict:
    """Tables, figures and claims of every experiment with rows in the store."""
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
        sc = _scores(store, method, params_key(method, {"partners": N}), range(M))
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
    twice = _scores(store, cfg.method, params_key(cfg.method, {**cfg.method_params, "partners": N}), range(M, 2 * M))
    half_n = max(1, N // 2)
    half = _scores(store, cfg.method, params_key(cfg.method, {**cfg.method_params, "partners": half_n}), range(M))
    if set(ids) <= set(twice) and set(ids) <= set(half):
        c_m = spearman([main[i] for i in ids], [twice[i] for i in ids], seed=cfg.seed)
        c_n = spearman([main[i] for i in ids], [half[i] for i in ids], seed=cfg.seed)
        out["tables"].append(Table("Robustness of scores to M and N (A.13, A.14)", ["comparison", "ρ", "95% CI", "p"],
                                   [[f"trials 1–{M} vs trials {M + 1}–{2 * M} (N={N})", f"{c_m.rho:.3f}",
                                     f"[{c_m.ci[0]:.2f}, {c_m.ci[1]:.2f}]", f"{c_m.p:.2g}"],
                                    [f"N={N} vs N={half_n} (M={M})", f"{c_n.rho:.3f}",
                                     f"[{c_n.ci[0]:.2f}, {c_n.ci[1]:.2f}]", f"{c_n.p:.2g}"]]))
        vs = [directional("M", c_m, +1), directional("N", c_n, +1)]
        out["claims"]["mn_agree"] = Verdict(
            "Scores agree across M and N (A.3)", f"ρ(M halves) = {c_m.rho:+.2f}; ρ(N vs N/2) = {c_n.rho:+.2f}",
            "; ".join(v.evidence for v in vs),
            "supported" if all(v.verdict == "supported" for v in vs)
            else "contradicted" if any(v.verdict == "contradicted" for v in vs) else "inconclusive")
    return out
