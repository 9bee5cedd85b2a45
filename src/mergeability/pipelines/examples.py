"""The example-level run (paper §2, §3.1) on any PopQA-schema dataset: screen every question with the base model
→ train one update per base-wrong question on its passage → keep the updates that flip their question →
M trials per kept update → scores.csv. Each stage does only what the store does not already hold."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from mergeability import run
from mergeability.analysis.summary import example_summary, example_summary_rows
from mergeability.backends import check_backend, local_pool
from mergeability.config import ExampleConfig, validate
from mergeability.console import print_table, progress
from mergeability.data import build_items, load_facts
from mergeability.data.leakage import Taught, audit
from mergeability.data.passages import check_passage_source, with_passages
from mergeability.data.sources import answer_pools
from mergeability.engine import Engine
from mergeability.errors import MergeabilityError
from mergeability.models import module_name, num_layers
from mergeability.pipelines.stages import Outcome, WorkerSetup, finish, load_run_model, safe_name, trials_stage
from mergeability.scoring import PlainScorer
from mergeability.training import split_passage, train_update, train_updates_cached
from mergeability.updates import save_update

SCORE_COLUMNS = ["id", "score", "relation", "subj", "obj", "s_pop", "gold_prob", "gold_rank", "gap", "post_gold_prob",
                 "post_gap", "train_loss", "passage_ppl", "passage_tokens", "fro_norm", "top_sv", "leak"]


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written to the run directory."""

    cfg: ExampleConfig
    lm: object
    items: list
    modules: list[str]
    scorer: object  # Engine or PlainScorer: .score([(item, update or None), ...]) -> [ItemScore]
    sequences: dict  # item id -> its passage's training sequences (`training_sequences`)

    @property
    def engine(self) -> Engine | None:
        return self.scorer if isinstance(self.scorer, Engine) else None


def check_settings(cfg: ExampleConfig) -> None:
    """The settings that need no data or model, checked first: every value (`config.validate`, again: a config
    built in Python reaches here unchecked), then what depends on two settings or on what is installed."""
    validate(cfg)
    d, m, t = cfg.data, cfg.merge, cfg.training
    if m.partners >= d.items:
        raise MergeabilityError(f"--partners {m.partners} is larger than the pool: at most {d.items - 1} "
                                f"other updates can exist with --items {d.items}")
    check_backend(cfg)
    check_passage_source(d.dataset, d.passages)  # before PopQA is downloaded from the hub
    if t.update == "full" and m.method == "knots":
        raise MergeabilityError("knots needs low-rank (LoRA) updates: with --update full use --method ties or mean")


def training_sequences(items, tokenizer, max_tokens: int) -> dict[str, list]:
    """Each item's training sequences (its passage's non-empty lines, in windows of `max_tokens`), for every item:
    any item the base model gets wrong is trained, so each must have text to train on, checked before the run
    directory exists rather than after screening."""
    out: dict[str, list] = {}
    by_text: dict[str, list] = {}  # items about one subject share its passage: tokenise it once
    for it in items:
        text = it.fact.passage
        if not text:
            raise MergeabilityError(f"item {it.id} has no training passage: add a 'passage' column or pass --passages")
        if text not in by_text:
            by_text[text] = split_passage(tokenizer, text, max_tokens)
        if not by_text[text]:
            raise MergeabilityError(f"item {it.id}: its passage has no line of two or more tokens to train on: give "
                                    f"subject {it.fact.subj!r} a longer passage")
        out[it.id] = by_text[text]
    return out


def prepare_examples(cfg: ExampleConfig) -> Prepared:
    """Check the settings, build the items and load the model: all bad input is found here."""
    check_settings(cfg)
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    d = cfg.data
    facts = load_facts(d.dataset, relations=d.relations, limit=d.items, seed=cfg.seed, per_subject=d.per_subject,
                       n_options=d.n_options)
    facts = with_passages(facts, d.passages, d.dataset)  # the sampled facts only: fetch no page the run skips
    pools = answer_pools(d.dataset, {f.prop for f in facts})
    items = build_items(facts, pools=pools, n_options=d.n_options, k_shot=d.k_shot, distractors=d.distractors,
                        seed=cfg.seed)
    lm = load_run_model(cfg.model)
    layer = num_layers(lm.model) // 2 if cfg.training.layer is None else cfg.training.layer
    modules = [module_name(lm.model, layer, t) for t in cfg.training.targets]
    sequences = training_sequences(items, lm.tokenizer, cfg.training.max_tokens)
    if cfg.engine == "fast":
        scorer = Engine(lm.model, lm.tokenizer, modules, norm=d.norm, batch_rows=cfg.batch_rows)
    else:
        scorer = PlainScorer(lm.model, lm.tokenizer, norm=d.norm)
    return Prepared(cfg, lm, items, modules, scorer, sequences)


def example_evaluator(prep: Prepared):
    """evaluate(trials, merged) -> [Outcome]: each trial's item scored with its merged update, in one batch."""
    by_id = {it.id: it for it in prep.items}

    def evaluate(trials, merged):
        scores = prep.scorer.score([(by_id[t.target], m) for t, m in zip(trials, merged)])
        return [Outcome(int(s.correct), tuple(s.probs)) for s in scores]

    return evaluate


def screen_job(prep: Prepared, _, span: tuple[int, int]) -> list:
    """One job: the base model's scores of the items in prep.items[span]."""
    return prep.scorer.score([(it, None) for it in prep.items[span[0] : span[1]]])


def screen(prep: Prepared, store, bars) -> None:
    """Score every item with the base model."""
    done = store.ids("items")
    items = prep.items
    bar = bars.stage("screen", len(items), len(done & {it.id for it in items}))
    step = prep.cfg.batch_rows
    spans = [(s, s + step) for s in range(0, len(items), step)]
    todo = [sp for sp in spans if not all(it.id in done for it in items[sp[0] : sp[1]])]
    with closing(local_pool(prep.cfg, prep, None)) as pool:
        for k, scores in pool.map(screen_job, todo):
            record_screened(store, items[todo[k][0] : todo[k][1]], scores, done, bar)


def record_screened(store, chunk, scores, done: set, bar) -> None:
    """Store the base model's scores of a chunk of items."""
    for it, s in zip(chunk, scores):
        if it.id in done:
            continue
        store.add_item(dict(id=it.id, relation=it.fact.prop, subj=it.fact.subj, question=it.fact.question,
                            obj=it.fact.obj, s_pop=it.fact.s_pop, options=list(it.options), gold=it.gold,
                            correct=int(s.correct), scores=list(s.scores), gold_prob=s.gold_prob,
                            gold_rank=s.gold_rank, gap=s.gap))
        bar.advance()


def training_batches(prep: Prepared, wrong: list[str]) -> tuple[list[list[str]], dict]:
    """The training sequences of each base-wrong item's passage, and the batches they train in.

    Batches have fixed members (passages with equal numbers of sequences, by token count, then run order), so a
    resumed run trains a half-recorded batch exactly as the uninterrupted run did. A batch pads its rows to the
    longest, so neighbours by length waste little: on the demo's 40 passages, padded tokens are 1.06x the real
    ones against 1.32x in run order (benchmarks/bench_train_grouping.py times it on 16 geo passages: 0.88x)."""
    seqs = {i: prep.sequences[i] for i in wrong}  # checked in the prepare step: every item has some
    step = prep.cfg.training.batch if prep.engine is not None else 1
    batches: list[list[str]] = []
    size = lambda i: (len(seqs[i]), sum(s.shape[1] for s in seqs[i]))
    for i in sorted(wrong, key=size):  # stable: run order within equal sizes
        last = batches[-1] if batches else None
        if last is None or len(last) == step or len(seqs[last[0]]) != len(seqs[i]):
            batches.append([])
        batches[-1].append(i)
    return batches, seqs


def train_batch(prep: Prepared, ids: list[str], seqs: dict) -> list:
    """(update, stats) per item of one batch: from the engine's cache together, or one at a time (plain)."""
    cfg, dev = prep.cfg, prep.cfg.model.device
    passages = [[s.to(dev) for s in seqs[i]] for i in ids]
    if prep.engine is not None:
        return train_updates_cached(prep.engine, passages, ids, prep.modules, cfg.training, seed=cfg.seed,
                                    base_model=cfg.model.name)
    return [train_update(prep.lm.model, passages[0], prep.modules, cfg.training, seed=cfg.seed, key=ids[0],
                         base_model=cfg.model.name)]


def train_job(prep: Prepared, seqs: dict, ids: list[str]) -> list:
    """One job: train a batch's updates, then score each item with its own update: [(update, stats, score)]."""
    by_id = {it.id: it for it in prep.items}
    trained = train_batch(prep, ids, seqs)
    post = prep.scorer.score([(by_id[i], upd) for i, (upd, _) in zip(ids, trained)])
    return [(upd, stats, s) for (upd, stats), s in zip(trained, post)]


def train(prep: Prepared, store, out: Path, bars) -> None:
    """Train one update per base-wrong item; keep (save) it if it makes the item correct."""
    by_id = {it.id: it for it in prep.items}
    wrong_ids = store.wrong_items()
    wrong = [it.id for it in prep.items if it.id in wrong_ids]  # the run's item order, not the store's
    done = store.ids("updates", "item_id")
    bar = bars.stage("train", len(wrong), len(done & set(wrong)))
    batches, seqs = training_batches(prep, wrong)
    # longest batches first (they come shortest first): with worker processes, the last job to start is then a
    # short one, and no worker idles long while another finishes the longest. The order changes no result
    todo = [ids for ids in reversed(batches) if not all(i in done for i in ids)]
    with closing(local_pool(prep.cfg, prep, seqs)) as pool:
        for k, results in pool.map(train_job, todo):
            record_trained(store, out, by_id, todo[k], results, done, bar)


def record_trained(store, out: Path, by_id: dict, ids: list[str], results: list, done: set, bar) -> None:
    """Store a trained batch: every update's statistics, and the update itself where it makes its item correct."""
    for i, (upd, stats, s) in zip(ids, results):
        if i in done:
            continue
        path = Path(run.UPDATES) / safe_name(i)
        if s.correct:
            save_update(upd, out / path, force=True)
        store.add_update(dict(item_id=i, path=str(path) if s.correct else None, kept=int(s.correct),
                              train_loss=stats.loss, passage_ppl=stats.base_ppl,
                              passage_tokens=stats.input_tokens, post_scores=list(s.scores),
                              post_gold_prob=s.gold_prob, post_gap=s.gap, fro_norm=upd.fro_norm(),
                              top_sv=upd.top_singular_value(), passage=by_id[i].fact.passage))
        bar.advance()


def kept_updates(prep: Prepared, store, out: Path) -> dict:
    """The kept updates of this run's items, loaded, by id; a one-line error if too few for N partners."""
    kept = run.load_kept(store, out, {it.id for it in prep.items})
    n = prep.cfg.merge.partners
    if len(kept) <= n:
        raise MergeabilityError(f"--partners {n} is larger than the pool: only {len(kept)} updates "
                                f"were kept; lower --partners or raise --items, then --resume")
    return kept


def subjects(prep: Prepared) -> dict[str, str]:
    """item id -> subject: the groups partners are kept apart by (items about one subject share a passage)."""
    return {it.id: it.fact.subj for it in prep.items}


def leak_audit(prep: Prepared, store, pool: list[str]) -> set[str]:
    """The updates of `pool` whose fact another update's training text states (`leakage.audit`): subjects and
    answers from the run's items, the text each update was trained on from the store. Recorded as meta."""
    by_id = {it.id: it for it in prep.items}
    stored = store.kept_passages()
    # a store of schema 1 recorded no passage: the item's own is what that run trained on
    taught = [Taught(i, f.subj, (f.obj, *f.possible_answers), stored.get(i) or f.passage or "")
              for i in pool for f in [by_id[i].fact]]
    leaking = audit(taught)
    store.set_meta("leakage", {"leaking": len(leaking), "audited": len(taught), "ids": sorted(leaking)})
    return leaking


def score_rows(cfg: ExampleConfig, store, pool: list[str], leaking: set[str] = frozenset()) -> list[dict]:
    """One row per scored update of `pool`: its score, every feature recorded and whether it leaks (SCORE_COLUMNS)."""
    sc = run.scores(store, run.run_key(cfg), pool, cfg.merge.trials)
    rows = ({**r, "score": sc[r["id"]], "leak": int(r["id"] in leaking)} for r in store.kept_update_rows()
            if r["id"] in sc)
    return [{c: r[c] for c in SCORE_COLUMNS} for r in rows]


def run_examples(cfg: ExampleConfig, out: Path, *, resume: bool = False, console: Console | None = None) -> dict:
    """Screen → train → trials → scores.csv. Returns the summary."""
    console = console or Console()
    out = run.check_new(out, resume, cfg)  # a run of another kind is refused before the model loads
    timings = run.Timings()
    with timings.stage("load"):
        prep = prepare_examples(cfg)  # all bad input is found here, before the run directory exists
    store = run.create(out, cfg)
    store.set_meta("provenance", run.provenance(cfg, norm=cfg.data.norm, modules=prep.modules))
    with progress(console) as bars:
        with timings.stage("screen"):
            screen(prep, store, bars)
        with timings.stage("train"):
            train(prep, store, out, bars)
        with timings.stage("trials"):
            updates = kept_updates(prep, store, out)
            pool = sorted(updates)
            setup = WorkerSetup(cfg, prepare_examples, example_evaluator)
            trials_stage(cfg, store, setup, example_evaluator(prep), updates, pool, run.run_key(cfg), bars,
                         "trials", chunk=cfg.batch_rows, reference=cfg.engine == "plain", groups=subjects(prep))
    leaking = leak_audit(prep, store, pool)  # before the summary, which reports it
    summary = example_summary(cfg, store, pool)
    summary["timings"] = finish(out, store, timings, SCORE_COLUMNS, score_rows(cfg, store, pool, leaking))
    print_table(console, "mergeability run", ["", "value"], example_summary_rows(summary, console=True))
    return summary
