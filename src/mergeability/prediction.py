"""`mergeability predict RUN_DIR`: predict each update's mergeability score from features that need no merge trial,
and measure the predictor honestly on a finished run.

The recipe: the run's scored updates and their features (base-model knowledge and training signals from the store,
weight properties and pool-relative interference from the factors, the hidden-state shift at the update's own
prompts), one cheap measured proxy (every update evaluated once under one merge of a random pool-sized set), then
grouped cross-validation (`analysis.predict`): relations (example level) or task families (task level) are never
split between fitting and scoring. Writes `features.csv`, `predict.json` (metrics, baselines, importances,
calibration, costs, provenance) and `predictor.joblib` (the best no-merge model fitted on every update), which
`mergeability plan --predictor RUN_DIR` loads.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import joblib
import numpy as np

from mergeability import run
from mergeability.activations import hidden_shifts
from mergeability.analysis import predict as cv
from mergeability.analysis.features import FEATURES as EXAMPLE_FEATURES
from mergeability.analysis.features import load_features
from mergeability.atomic import atomic_file, write_json, write_text
from mergeability.console import progress
from mergeability.errors import MergeabilityError
from mergeability.estimate import plan_trials, trial_chunk
from mergeability.experiments.context import Context, kept_updates, main_scores, open_context, run_merge_sets
from mergeability.interference import FEATURES as INTERFERENCE_FEATURES
from mergeability.interference import pool_features
from mergeability.pipelines.survey import majority
from mergeability.pipelines.tasks import test_examples
from mergeability.updates import Update, load_update
from mergeability.version import __version__

PREDICTOR, RESULT, TABLE = "predictor.joblib", "predict.json", "features.csv"
# What `plan` can compute for a user's adapters from their eval files and weights alone: a task-level run's saved
# predictor reads only these, so that `plan --predictor RUN_DIR` can use it
PORTABLE = ("base_acc", "majority_margin", "ft_acc", "gain", "fro_norm", "top_sv", *INTERFERENCE_FEATURES)
PORTABLE_TAG = " (plan features)"
RECORDED = " (recorded)"  # a model on the features the run recorded anyway: no cost beyond the run
PROXY = "predict-proxy"  # the store's experiment rows of the one-merge proxy
TASK_FEATURES = ("base_acc", "majority_margin", "ft_acc", "gain", "train_loss", "answer_ppl", "train_tokens",
                 "prompt_tokens", "fro_norm", "top_sv")
LABELS = {"cos_rest": "cosine with the rest's mean ΔW", "pairwise_cos": "mean pairwise cosine (ModelKinship)",
          "subspace_energy": "energy in the rest's top subspace", "subspace_overlap":
          "mean subspace overlap (Mergeability-Bench)", "sign_conflict": "TIES sign-conflict rate",
          "effective_rank": "effective rank of ΔW", "shift_ratio": "hidden shift: pool mean / own",
          "shift_cos": "hidden shift: cosine pool mean vs own", "proxy": "one-merge proxy",
          "base_acc": "base accuracy", "majority_margin": "base − majority rate", "ft_acc": "fine-tuned accuracy",
          "gain": "fine-tuned − base", "linear": "ridge, every no-merge feature",
          "boosting": "gradient boosting, every no-merge feature", f"linear{RECORDED}": "ridge, recorded features only",
          f"boosting{RECORDED}": "gradient boosting, recorded features only",
          f"linear{PORTABLE_TAG}": "ridge, the features plan computes",
          f"boosting{PORTABLE_TAG}": "gradient boosting, the features plan computes",
          **{k: v[0] for k, v in EXAMPLE_FEATURES.items()}}


@dataclass(frozen=True)
class Predict:
    """How `predict` measures; the run decides what (its method, M, N and updates)."""

    n_splits: int = 5  # grouped CV folds (fewer when there are fewer groups)
    density: float = 0.2  # TIES trim of the sign-conflict feature (the fraction of entries kept)
    prompts: int = 8  # task level: test prompts per task for the hidden-shift feature
    n_boot: int = 1000  # bootstrap draws of each ρ's CI

    def __post_init__(self):
        if self.n_splits < 2 or self.prompts < 1 or self.n_boot < 100 or not 0 < self.density <= 1:
            raise MergeabilityError("predict: n_splits ≥ 2, prompts ≥ 1, n_boot ≥ 100, density in (0, 1]")


@dataclass(frozen=True)
class SavedPredictor:
    """A fitted model and the features it reads, in order; `predict(rows)` gives scores in [0, 1]."""

    model: object
    features: list[str]
    level: str  # "examples" | "tasks"
    meta: dict

    def predict(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        X = np.array([[float(r.get(f, np.nan)) for f in self.features] for r in rows], dtype=float)
        return np.clip(self.model.predict(X), 0.0, 1.0)


def load_predictor(run_dir: Path) -> SavedPredictor:
    """The predictor `mergeability predict` saved with a run; a one-line error when there is none."""
    path = Path(run_dir) / PREDICTOR
    if not path.is_file():
        raise MergeabilityError(f"{run_dir} has no {PREDICTOR}: run `mergeability predict {run_dir}` first")
    saved = joblib.load(path)  # written by this tool into the run directory (never a downloaded file)
    if not isinstance(saved, dict) or not {"model", "features", "level", "meta"} <= set(saved):
        raise MergeabilityError(f"{path} is not a predictor this tool wrote: run `mergeability predict` again")
    return SavedPredictor(**{k: saved[k] for k in ("model", "features", "level", "meta")})


def task_family(name: str) -> str:
    """Natural Instructions / Lots-of-LoRAs `task{NNN}_{dataset}_{…}` -> its source dataset; others: the name."""
    m = re.match(r"task\d+_([a-z0-9]+)", name)
    return m.group(1) if m else name


# ------------------------------------------------------------------------------------------------ features


@dataclass
class Gathered:
    ids: list[str]
    score: np.ndarray
    groups: np.ndarray
    features: dict[str, np.ndarray]  # the no-merge features, by name, aligned with ids
    recorded: list[str]  # those the run recorded anyway (knowledge, training signals, norms): free
    proxy: np.ndarray
    seconds: dict[str, float]


def _examples(ctx: Context) -> tuple[dict, dict, dict, dict[str, list[str]]]:
    """(updates, scores, store features incl. 'relation', prompts) of an example-level run."""
    updates = kept_updates(ctx)
    sc = main_scores(ctx, updates)
    data = load_features(ctx.store, sc)
    updates = {i: updates[i] for i in data["id"]}
    prompts = {it.id: [it.prompt] for it in ctx.prepared().items if it.id in updates}
    feats = {f: data[f] for f in EXAMPLE_FEATURES}
    return updates, {i: sc[i] for i in data["id"]}, {"group": data["relation"], **feats}, prompts


def _tasks(ctx: Context, n_prompts: int) -> tuple[dict, dict, dict, dict[str, list[str]]]:
    """(updates, scores, store features incl. 'group' = task family, prompts) of a task-level run."""
    pools = run.task_pools(ctx.store)
    if ctx.cfg.data.threshold not in pools:
        raise MergeabilityError(f"{ctx.run_dir} has no trials yet: finish the run first (--resume)")
    sc = run.task_scores(ctx.cfg, ctx.store, pools[ctx.cfg.data.threshold])
    rows = {r["name"]: r for r in ctx.store.task_rows() if r["name"] in sc}
    ids = sorted(rows)
    tasks = {t.name: t for t in ctx.prepared().tasks}
    tests = {n: test_examples(ctx.cfg, tasks[n]) for n in ids}
    col = lambda f: np.array([np.nan if f not in rows[n] or rows[n][f] is None else rows[n][f] for n in ids], float)  # noqa: E731
    feats = {f: col(f) for f in ("base_acc", "ft_acc", "train_loss", "answer_ppl", "train_tokens",
                                 "prompt_tokens", "fro_norm", "top_sv")}
    feats["gain"] = feats["ft_acc"] - feats["base_acc"]
    feats["majority_margin"] = feats["base_acc"] - np.array([majority(tests[n])[1] for n in ids])
    updates = {n: load_update(ctx.run_dir / rows[n]["path"]) for n in ids}
    prompts = {n: [e.input for e in tests[n][:n_prompts]] for n in ids}
    return updates, {n: sc[n] for n in ids}, {"group": np.array([task_family(n) for n in ids]), **feats}, prompts


def proxy_units(ctx: Context, ids: Sequence[str], size: int) -> list[tuple[str, dict]]:
    """Every update once, in seeded sets of `size` (the run's N + 1) whose members share no group (subject)."""
    rng = random.Random(f"{ctx.cfg.seed}/predict-proxy")
    groups = ctx.groups() or {}
    left = sorted(ids)
    rng.shuffle(left)
    sets: list[list[str]] = []
    for i in left:
        home = next((s for s in sets if len(s) < size and all(groups.get(j, j) != groups.get(i, i) for j in s)), None)
        (home.append(i) if home is not None else sets.append([i]))
    return [(json.dumps(sorted(s)), {"merge": sorted(s)}) for s in sets]


def measure_proxy(ctx: Context, updates: Mapping[str, Update], console) -> tuple[dict[str, float], float]:
    """(id -> correctness (examples) or accuracy (tasks) under one merge of a random set of N + 1 members, the
    share of the merges run now rather than resumed from the store)."""
    m = ctx.cfg.merge
    units = proxy_units(ctx, list(updates), m.partners + 1)
    reference = ctx.cfg.engine == "plain" if ctx.cfg.kind == "examples" else False
    ran = run_merge_sets(ctx, PROXY, units, updates, console,
                         lambda u: (m.method, dict(m.params), u["merge"], None, reference),
                         lambda p, outcomes: {"members": p[2], "correct": [o.correct for o in outcomes]})
    rows = ctx.store.experiment_rows(PROXY)
    return {i: c for key, _ in units for i, c in zip(rows[key]["members"], rows[key]["correct"])}, ran / len(units)


def _rank_of(updates: Mapping[str, Update]) -> int:
    return max(getattr(d, "rank", min(d.shape)) for u in updates.values() for d in u.modules.values())


def gather(ctx: Context, spec: Predict, console) -> Gathered:
    """Every feature of every scored update, each group timed (the cost the report sets against the trials')."""
    if ctx.cfg.kind == "examples":
        updates, sc, store_feats, prompts = _examples(ctx)
    else:
        updates, sc, store_feats, prompts = _tasks(ctx, spec.prompts)
    cv.grouped_splits(np.asarray(store_feats["group"]), spec.n_splits)  # too few to cross-validate: say so first
    ids, seconds = list(updates), {}
    t = time.perf_counter()
    inter = pool_features(updates, k=ctx.cfg.merge.partners * _rank_of(updates), density=spec.density)
    seconds["interference"] = time.perf_counter() - t
    lm = ctx.prepared().lm
    t = time.perf_counter()
    with progress(console) as bars:
        bar = bars.stage("hidden shifts", len(ids), 0)
        shifts = hidden_shifts(lm.model, lm.tokenizer, prompts, updates, progress=bar.advance)
    seconds["hidden_shift"] = time.perf_counter() - t
    t = time.perf_counter()
    proxy, fresh = measure_proxy(ctx, updates, console)
    # merges resumed from an earlier `predict` cost nothing now: scale what ran, or leave the cost unknown
    seconds["proxy"] = (time.perf_counter() - t) / fresh if fresh else None
    seconds["trials"] = trial_seconds(ctx, updates)
    feats = {f: v for f, v in store_feats.items() if f != "group"}
    for name in (*next(iter(inter.values())), "shift_ratio", "shift_cos"):
        src = inter if name in next(iter(inter.values())) else shifts
        feats[name] = np.array([src[i][name] for i in ids], dtype=float)
    recorded = [f for f in store_feats if f != "group"]
    return Gathered(ids, np.array([sc[i] for i in ids], float), np.asarray(store_feats["group"]), feats, recorded,
                    np.array([proxy[i] for i in ids], float), seconds)


# ------------------------------------------------------------------------------------------------ evaluation


def usable(features: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(features with at least two distinct finite values, names of the others: nothing to learn from)."""
    keep, dropped = {}, []
    for f, v in features.items():
        finite = v[np.isfinite(v)]
        (keep.__setitem__(f, v) if finite.size and np.unique(finite).size > 1 else dropped.append(f))
    return keep, dropped


def _best(evals: Sequence[cv.Evaluation], tag: str | None = None) -> cv.Evaluation:
    """The model with the highest grouped-CV ρ (among those named with `tag`, when given)."""
    models = [e for e in evals if e.kind == "model" and (tag is None or e.name.endswith(tag))]
    return max(models, key=lambda e: -math.inf if math.isnan(e.rho) else e.rho)


def _models_on(feats: dict, tag: str, g: Gathered, spec: Predict, seed: int) -> list[cv.Evaluation]:
    """Both models on a subset of the features, their names tagged."""
    evals = cv.compare(feats, g.score, g.groups, baselines=[], seed=seed, n_splits=spec.n_splits)
    return [dataclasses.replace(e, name=f"{e.name}{tag}") for e in evals]


def evaluate_features(g: Gathered, spec: Predict, seed: int, level: str) -> dict:
    """Grouped-CV metrics of both models on every no-merge feature, on the recorded ones alone (free: the run
    measured them anyway) and, at task level, on those `plan` can compute; of every baseline. The saved model is
    the best (at task level the best on plan's features), with its importances and calibration, fitted on all."""
    feats, dropped = usable(g.features)
    evals = cv.compare(feats, g.score, g.groups, seed=seed, n_splits=spec.n_splits)
    subsets = {RECORDED: {f: v for f, v in feats.items() if f in g.recorded}}
    if level == "tasks":
        subsets[PORTABLE_TAG] = {f: v for f, v in feats.items() if f in PORTABLE}
    for tag, sub in subsets.items():
        evals[2:2] = _models_on(sub, tag, g, spec, seed)
    proxy = cv.evaluate("proxy", "proxy", cv.single_feature(g.proxy, g.score, g.groups, spec.n_splits), g.score,
                        g.groups, seed=seed, n_boot=spec.n_boot)
    best = _best(evals, PORTABLE_TAG if level == "tasks" else None)
    use = next((sub for tag, sub in subsets.items() if best.name.endswith(tag)), feats)
    make = cv.linear_model if best.name.startswith("linear") else (lambda: cv.boosting_model(seed))
    X = np.column_stack(list(use.values()))
    return {"evaluations": [e.row() for e in (*evals, proxy)], "best": best.name, "dropped": dropped,
            "features": list(use), "importances": cv.importances(make, X, g.score, list(use), seed=seed),
            "calibration": cv.calibration(best.predictions, g.score), "model": cv.fit_final(make, X, g.score),
            "oof": {"best": best.predictions.tolist(), "proxy": proxy.predictions.tolist()}}


def trial_seconds(ctx: Context, updates: Mapping[str, Update], sample: int = 16) -> float:
    """Seconds the run's M × N trials of `updates` take here: `sample` of them (the run's own plan, in chunks of
    the run's batch) merged and evaluated now, in this process, and scaled up. What the features are set against,
    measured on the same machine at the same time (a run's recorded timings may be a resume's, or another
    machine's)."""
    cfg, ids = ctx.cfg, sorted(updates)
    plan = plan_trials(cfg.seed, ids, ids, cfg.merge.trials, cfg.merge.partners, ctx.groups())
    picked = random.Random(f"{cfg.seed}/predict-cost").sample(plan, min(sample, len(plan)))
    chunk = cfg.batch_rows if cfg.kind == "examples" else 1
    evaluate, t = ctx.evaluator(), time.perf_counter()
    for s in range(0, len(picked), chunk):
        trial_chunk(evaluate, updates, (cfg.merge.method, dict(cfg.merge.params), picked[s:s + chunk], False))
    return (time.perf_counter() - t) / len(picked) * len(plan)


def costs(seconds: Mapping[str, float]) -> dict:
    """Each feature group's seconds beside the trials' (`seconds["trials"]`, from `trial_seconds`); the proxy's
    are None when every one of its merges was resumed from an earlier `predict` (not timed)."""
    no_merge, proxy = seconds["interference"] + seconds["hidden_shift"], seconds["proxy"]
    return {**{k: None if v is None else round(v, 2) for k, v in seconds.items()},
            "no_merge_share": no_merge / seconds["trials"],
            "proxy_share": None if proxy is None else proxy / seconds["trials"]}


def feature_table(g: Gathered) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "group", "score", *g.features, "proxy"])
    for k, i in enumerate(g.ids):
        w.writerow([i, g.groups[k], g.score[k], *(g.features[f][k] for f in g.features), g.proxy[k]])
    return buf.getvalue()


def write_outputs(run_dir: Path, ctx: Context, g: Gathered, result: dict, spec: Predict) -> dict:
    """features.csv, predict.json and predictor.joblib, each written atomically."""
    cfg = ctx.cfg
    prov = run.provenance(cfg, method=cfg.merge.method, params=dict(cfg.merge.params), trials=cfg.merge.trials,
                          partners=cfg.merge.partners, predict=asdict(spec),
                          data=(ctx.store.get_meta("provenance") or {}).get("data"))
    out = {k: v for k, v in result.items() if k != "model"}
    out.update(level=cfg.kind, ids=g.ids, scores=g.score.tolist(), n=len(g.ids),
               groups=int(np.unique(g.groups).size), costs=costs(g.seconds),
               thresholds={"lost": cv.LOST, "survives": cv.SURVIVES}, provenance=prov)
    write_text(run_dir / TABLE, feature_table(g))
    write_json(run_dir / RESULT, out)
    saved = {"model": result["model"], "features": result["features"], "level": cfg.kind,
             "meta": {"best": result["best"], "version": __version__, "run": str(run_dir)}}
    with atomic_file(run_dir / PREDICTOR, suffix=".joblib") as tmp:
        joblib.dump(saved, tmp)
    return out


def predict_run(run_dir: Path, console, overrides: dict | None = None, spec: Predict = Predict()) -> dict:
    """Gather the features of a finished run, cross-validate the predictors, write the results; returns them."""
    run_dir = Path(run_dir)
    run.run_config(run_dir)  # a directory that is not a run is refused before anything is written
    run.check_writable(run_dir, "predict")
    ctx = open_context(run_dir, overrides or {})
    try:
        g = gather(ctx, spec, console)
        return write_outputs(run_dir, ctx, g, evaluate_features(g, spec, ctx.cfg.seed, ctx.cfg.kind), spec)
    finally:
        ctx.store.close()


def read_result(run_dir: Path) -> dict | None:
    """predict.json of a run, or None where `predict` has not been run."""
    path = Path(run_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None
