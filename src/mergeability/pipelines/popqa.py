"""End-to-end recipes. Each stage reads what the store already has and does only what is missing."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mergeability.config import RunConfig, save_config
from mergeability.errors import MergeabilityError


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written to the run directory."""

    cfg: RunConfig
    lm: object
    items: list
    modules: list[str]
    scorer: object  # Engine or PlainScorer: .score([(item, update or None), ...]) -> [ItemScore]


def prepare_popqa(cfg: RunConfig) -> Prepared:
    from mergeability.data import build_items, load_facts
    from mergeability.models import load_model, module_name, num_layers
    from mergeability.scoring import NORMS

    if cfg.items <= 0:
        raise MergeabilityError(f"--items must be at least 1, got {cfg.items}")
    if cfg.trials <= 0 or cfg.partners < 0:
        raise MergeabilityError("--trials must be ≥ 1 and --partners ≥ 0")
    if cfg.partners >= cfg.items:
        raise MergeabilityError(f"--partners {cfg.partners} is larger than the pool: at most {cfg.items - 1} "
                                f"other updates can exist with --items {cfg.items}")
    from mergeability.backends import check_backend

    check_backend(cfg)
    if cfg.engine not in ("fast", "plain"):
        raise MergeabilityError(f"unknown engine {cfg.engine!r}: use fast or plain")
    if cfg.norm not in NORMS:
        raise MergeabilityError(f"unknown normalisation {cfg.norm!r}: use one of {', '.join(NORMS)}")
    from mergeability.merging import get_method

    get_method(cfg.method, **cfg.method_params)
    if cfg.update not in ("lora", "full"):
        raise MergeabilityError(f"unknown update kind {cfg.update!r}: use lora or full")
    if cfg.update == "full" and cfg.method == "knots":
        raise MergeabilityError("knots needs low-rank (LoRA) updates: with --update full use --method ties or mean")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    facts = load_facts(cfg.dataset, relations=cfg.relations, limit=cfg.items, seed=cfg.seed)
    pools = None
    if cfg.dataset == "geo":
        from mergeability.data.geo import answer_pool

        pools = {r: answer_pool(r) for r in {f.prop for f in facts}}
    items = build_items(facts, pools=pools, n_options=cfg.n_options, k_shot=cfg.k_shot,
                        distractors=cfg.distractors, seed=cfg.seed)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
    layer = num_layers(lm.model) // 2 if cfg.layer is None else cfg.layer
    modules = [module_name(lm.model, layer, t) for t in cfg.targets]
    if cfg.engine == "fast":
        from mergeability.engine import Engine

        scorer = Engine(lm.model, lm.tokenizer, modules, norm=cfg.norm, batch_rows=cfg.batch_rows)
    else:
        from mergeability.scoring import PlainScorer

        scorer = PlainScorer(lm.model, lm.tokenizer, norm=cfg.norm)
    return Prepared(cfg, lm, items, modules, scorer)


def run_popqa(cfg: RunConfig, out: Path, *, resume: bool = False, console: Console | None = None) -> dict:
    """Screen → train → trials → scores.csv. Returns the summary."""
    from mergeability import __version__
    from mergeability.backends import pool_for
    from mergeability.estimate import plan_trials, run_trials
    from mergeability.training import TrainConfig, split_passage, train_lora, train_loras
    from mergeability.updates import load_update, save_update

    console = console or Console()
    out = check_out(out, resume)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare_popqa(cfg)  # all bad input is found here, before the run directory exists
    timings["load"] = time.perf_counter() - t0
    lm, items, modules, scorer = prep.lm, prep.items, prep.modules, prep.scorer
    engine = scorer if cfg.engine == "fast" else None
    model, tok = lm.model, lm.tokenizer
    store = start_run_dir(out, cfg)
    store.set_meta("provenance", {"model": cfg.model, "revision": cfg.revision, "dtype": cfg.dtype,
                                  "norm": cfg.norm, "seed": cfg.seed, "version": __version__,
                                  "modules": modules, "torch": torch.__version__})
    by_id = {it.id: it for it in items}

    with _progress(console) as progress:
        # 1. screen every item with the base model
        t = time.perf_counter()
        done = store.ids("items")
        task = progress.add_task("screen", total=len(items), completed=len(done & set(by_id)))
        for start in range(0, len(items), cfg.batch_rows):
            chunk = items[start : start + cfg.batch_rows]
            if all(it.id in done for it in chunk):
                continue
            for it, s in zip(chunk, scorer.score([(it, None) for it in chunk])):
                if it.id in done:
                    continue
                store.add_item(dict(id=it.id, relation=it.fact.prop, subj=it.fact.subj, question=it.fact.question,
                                    obj=it.fact.obj, s_pop=it.fact.s_pop, options=list(it.options), gold=it.gold,
                                    correct=int(s.correct), scores=list(s.scores), gold_prob=s.gold_prob,
                                    gold_rank=s.gold_rank, gap=s.gap))
                progress.advance(task)
        timings["screen"] = time.perf_counter() - t

        # 2. train one update per base-wrong item; keep it if it makes the item correct
        t = time.perf_counter()
        wrong_ids = {r["id"] for r in store.rows("SELECT id FROM items WHERE correct = 0")}
        wrong = [it.id for it in items if it.id in wrong_ids]  # the run's item order, not the store's
        done = store.ids("updates", "item_id")
        task = progress.add_task("train", total=len(wrong), completed=len(done & set(wrong)))
        tcfg = TrainConfig(rank=cfg.rank, alpha=cfg.alpha, lr=cfg.full_lr if cfg.update == "full" else cfg.lr,
                           epochs=cfg.epochs, update=cfg.update)
        for it in (by_id[i] for i in wrong):
            if not it.fact.passage:
                raise MergeabilityError(f"item {it.id} has no training passage: add a 'passage' column")
        # Batches have fixed members (passages with equal numbers of sequences, in run order), so a resumed
        # run trains a half-recorded batch exactly as the uninterrupted run did.
        seqs = {i: split_passage(tok, by_id[i].fact.passage, tcfg.max_tokens) for i in wrong}
        for i, sq in seqs.items():
            if not sq:
                raise MergeabilityError(f"item {i}: its passage has no line of two or more tokens to train on")
        order = sorted(wrong, key=lambda i: len(seqs[i]))  # stable: run order within equal lengths
        step = cfg.train_batch if engine is not None else 1
        batches, cur = [], []
        for i in order:
            if cur and (len(cur) == step or len(seqs[cur[0]]) != len(seqs[i])):
                batches.append(cur)
                cur = []
            cur.append(i)
        batches += [cur] if cur else []
        for batch in batches:
            chunk = [by_id[i] for i in batch]
            if all(it.id in done for it in chunk):
                continue
            passages = [[s.to(cfg.device) for s in seqs[it.id]] for it in chunk]
            if engine is not None:
                trained = train_loras(engine, passages, [it.id for it in chunk], modules, tcfg, seed=cfg.seed,
                                      base_model=cfg.model)
            else:
                trained = [train_lora(model, passages[0], modules, tcfg, seed=cfg.seed, key=chunk[0].id,
                                      base_model=cfg.model)]
            post = scorer.score([(it, upd) for it, (upd, _) in zip(chunk, trained)])
            for it, (upd, stats), s in zip(chunk, trained, post):
                if it.id in done:
                    continue
                path = out / "updates" / _safe(it.id)
                if s.correct:
                    save_update(upd, path, force=True)
                store.add_update(dict(item_id=it.id, path=str(path.relative_to(out)) if s.correct else None,
                                      kept=int(s.correct), train_loss=stats.loss, passage_ppl=stats.passage_ppl,
                                      passage_tokens=stats.passage_tokens, post_scores=list(s.scores),
                                      post_gold_prob=s.gold_prob, post_gap=s.gap, fro_norm=upd.fro_norm(),
                                      top_sv=upd.top_singular_value()))
                progress.advance(task)
        timings["train"] = time.perf_counter() - t

        # 3. mergeability trials
        t = time.perf_counter()
        kept = store.rows("SELECT item_id, path FROM updates WHERE kept = 1 ORDER BY item_id")
        kept = [r for r in kept if r["item_id"] in by_id]
        if len(kept) <= cfg.partners:
            raise MergeabilityError(f"--partners {cfg.partners} is larger than the pool: only {len(kept)} updates "
                                    f"were kept; lower --partners or raise --items, then --resume")
        updates = {r["item_id"]: load_update(out / r["path"]) for r in kept}
        pool = sorted(updates)
        plan = plan_trials(cfg.seed, pool, pool, cfg.trials, cfg.partners)
        key = run_key(cfg)
        done = store.done_trials(cfg.method, key)
        task = progress.add_task("trials", total=len(plan), completed=sum((p.target, p.trial) in done for p in plan))

        def record(trial, s):
            store.add_trial(dict(target=trial.target, trial=trial.trial, method=cfg.method, params=key,
                                 partners=list(trial.partners), correct=int(s.correct), probs=s.probs))
            progress.advance(task)

        evaluate = PopqaEvaluator.build(scorer, items)
        with pool_for(cfg, PopqaEvaluator(cfg), evaluate, updates) as workers:
            run_trials(plan, updates, cfg.method, cfg.method_params, evaluate, record, done, chunk=cfg.batch_rows,
                       pool=workers, reference=cfg.engine == "plain")
        timings["trials"] = time.perf_counter() - t

    summary = summarize(store, cfg, key, pool)
    write_scores_csv(store, key, pool, cfg.trials, out / "scores.csv")
    store.set_meta("timings", timings)
    store.close()
    summary["timings"] = timings
    print_summary(summary, console)
    return summary


def check_out(out: Path, resume: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise MergeabilityError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return out


def start_run_dir(out: Path, cfg):
    """Create (or reopen) a run directory once its input is checked: lock it, clear half-written adapter saves
    of a killed run, write the resolved config. Returns the store."""
    from mergeability.store import Store

    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "results.sqlite")  # takes the run's lock before anything is written
    (out / "updates").mkdir(exist_ok=True)
    for stale in (out / "updates").glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    save_config(cfg, out / "config.yaml")
    return store


class PopqaEvaluator:
    """Builds, inside a worker, what evaluates trials of an example-level run: its items and scorer. Picklable."""

    def __init__(self, cfg: RunConfig):
        self.cfg = dataclasses.replace(cfg, threads=None)  # a worker keeps the threads its backend gave it

    def __call__(self):
        prep = prepare_popqa(self.cfg)
        return self.build(prep.scorer, prep.items)

    @staticmethod
    def build(scorer, items):
        by_id = {it.id: it for it in items}
        return lambda trials, merged: scorer.score([(by_id[t.target], m) for t, m in zip(trials, merged)])


def run_key(cfg: RunConfig, partners: int | None = None) -> str:
    """The trial key of a run's own method and parameters (optionally with another N)."""
    from mergeability.estimate import params_key

    return params_key(cfg.method, {**cfg.method_params, "partners": cfg.partners if partners is None else partners})


def open_run_dir(run_dir: Path, *, lock: bool = True):
    """(config, store) of an existing run directory, or a one-line error if it is not one."""
    from mergeability.config import load_config
    from mergeability.store import Store

    run_dir = Path(run_dir)
    if not (run_dir / "results.sqlite").exists() or not (run_dir / "config.yaml").exists():
        raise MergeabilityError(f"{run_dir} is not a run directory: it has no results.sqlite and config.yaml")
    return load_config(run_dir / "config.yaml", cls=None), Store(run_dir / "results.sqlite", lock=lock)


def scores(store, key: str, pool, trials: int, first: int = 0, complete: bool = False) -> dict[str, float]:
    """Mergeability score per update: mean correctness over trials first … first + trials − 1 under `key`.

    Only those trials count: an experiment that adds trials to the same key never changes the run's score.
    With `complete`, updates missing any of those trials are left out.
    """
    rows = store.rows("SELECT target, AVG(correct) AS score, COUNT(*) AS n FROM trials WHERE params = ? "
                      "AND trial >= ? AND trial < ? GROUP BY target", (key, first, first + trials))
    keep = set(pool)
    return {r["target"]: r["score"] for r in rows if r["target"] in keep and (not complete or r["n"] == trials)}


def summarize(store, cfg: RunConfig, key: str, pool: list[str]) -> dict:
    items = store.rows("SELECT correct FROM items")
    upd = store.rows("SELECT kept FROM updates")
    sc = scores(store, key, pool, cfg.trials)
    hist = Counter(round(v * cfg.trials) for v in sc.values())
    return {
        "screened": len(items),
        "base_accuracy": sum(r["correct"] for r in items) / max(len(items), 1),
        "trained": len(upd),
        "kept": sum(r["kept"] for r in upd),
        "mean_score": sum(sc.values()) / max(len(sc), 1),
        "histogram": {f"{k / cfg.trials:.2f}": hist.get(k, 0) for k in range(cfg.trials + 1)},
    }


def write_scores_csv(store, key: str, pool: list[str], trials: int, path: Path) -> None:
    """One row per kept update: its score and every feature recorded so far. Written atomically."""
    sc = scores(store, key, pool, trials)
    rows = store.rows(
        "SELECT i.id, i.relation, i.subj, i.obj, i.s_pop, i.gold_prob, i.gold_rank, i.gap, "
        "u.post_gold_prob, u.post_gap, u.train_loss, u.passage_ppl, u.passage_tokens, u.fro_norm, u.top_sv "
        "FROM items i JOIN updates u ON u.item_id = i.id WHERE u.kept = 1 ORDER BY i.id"
    )
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        cols = ["id", "score", *[c for c in (rows[0] if rows else {}) if c != "id"]]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            if r["id"] in sc:
                w.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()},
                            "score": f"{sc[r['id']]:.6g}"})
    os.replace(tmp, path)


def print_summary(s: dict, console: Console) -> None:
    t = Table(title="mergeability run")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("items screened", str(s["screened"]))
    t.add_row("base accuracy", f"{s['base_accuracy']:.1%}")
    t.add_row("trained (base-wrong)", str(s["trained"]))
    t.add_row("kept (flipped to correct)", f"{s['kept']} ({s['kept'] / max(s['trained'], 1):.0%})")
    t.add_row("mean mergeability score", f"{s['mean_score']:.3f}")
    for k, v in s["histogram"].items():
        t.add_row(f"  score {k}", f"{v:3d} " + "█" * v)
    for k, v in s.get("timings", {}).items():
        t.add_row(f"time: {k}", f"{v:.1f} s")
    console.print(t)
