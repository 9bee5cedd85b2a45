"""`mergeability plan`: will my merge work, and how do I fix it (issue #16).

For adapters someone is about to merge, each with an eval file of its own: every file is split (seeded) into a
validation half and a held-out half; the base model, each adapter alone and the requested merge are measured on
both. An adapter survives when the merge keeps at least `SURVIVES` of its alone accuracy on its held-out half.
Beside the measurements stand the features a saved predictor (`mergeability predict`) reads: base knowledge,
the size of ΔW and its pool-relative interference (`interference.pool_features`).

When an adapter does not survive, three fixes are each verified by merging: base-accuracy weights (paper §6),
maximin weights found by a small search, and leaving the worst adapter out. Everything a fix is chosen or tuned
by is measured on the validation halves and every number that decides is measured on the held-out halves, so
the search cannot grade its own homework. `RULE` says which fix is recommended.
"""

from __future__ import annotations

import contextlib
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from mergeability.adapters import check_distinct, check_out, load_adapters, parse_params
from mergeability.atomic import check_creatable, jsonable, write_json
from mergeability.config import ExampleData, MergeConfig
from mergeability.data.facts import REQUIRED, load_file, read_rows
from mergeability.data.mc import alias_key, build_items
from mergeability.data.tasks import Example, read_split
from mergeability.errors import MergeabilityError, one_line
from mergeability.exact_match import evaluate_task
from mergeability.interference import FEATURES as POOL_FEATURES
from mergeability.interference import pool_features, truncate
from mergeability.merging import base_accuracy_weights, get_method
from mergeability.merging.base import check_updates, params_of
from mergeability.models import load_model
from mergeability.pipelines.survey import majority
from mergeability.pipelines.tasks import check_bases
from mergeability.prediction import PORTABLE, load_predictor
from mergeability.scoring import PlainScorer
from mergeability.seeding import rng
from mergeability.updates import Update, applied, representable, save_update
from mergeability.version import __version__

SURVIVES = 0.8  # an adapter survives the merge when it keeps this share of its alone accuracy (issue #16)
VAL, HELD = "validation", "held-out"
SEARCH_FACTORS = (2.0, 0.5)  # the maximin search tries each adapter's weight doubled and halved
SEARCH_MERGES = 4  # the search's budget: at most this many merges per adapter
FEATURE_DENSITY = 0.2  # the sign-conflict feature's TIES trim: `prediction.Predict.density`, which predictors use
FEATURES = PORTABLE  # what a task-level run's saved predictor reads (`prediction.PORTABLE`)
KEEP_ALL, LEAVE_ONE_OUT = "keep-all", "leave-one-out"
RULE = (f"a fix that keeps every adapter and makes every one survive on held-out (the best worst retention "
        f"first); else leaving the worst adapter out, when every remaining one then survives; else the keep-all "
        f"fix with the best worst retention, when it beats the plain merge's; else none. Survive: retention "
        f"≥ {SURVIVES:g}; an adapter whose alone accuracy is 0 has no retention and is not counted")
EVAL_KINDS = ("a task file (.jsonl/.parquet rows with input, output) or a PopQA-schema fact file "
              f"({', '.join(REQUIRED)})")


@dataclass(frozen=True)
class PlanRequest:
    """What `mergeability plan` was asked: the command line, typed."""

    adapters: tuple[Path, ...]
    evals: tuple[Path, ...]
    method: str | None = None  # None: the config's merge method (`MergeConfig`)
    params: tuple[str, ...] = ()  # --param KEY=VALUE texts
    predictor: Path | None = None
    max_rank: int | None = None
    out: Path | None = None
    json: Path | None = None
    model: str | None = None
    max_test: int | None = None
    seed: int = 0
    force: bool = False


# ------------------------------------------------------------------------------------------------- eval files


@dataclass(frozen=True)
class EvalSet:
    """One adapter's eval file: its items, split into a validation and a held-out half (indices into `items`)."""

    path: Path
    kind: str  # "tasks" (exact match) | "facts" (multiple choice, correct = gold ranked first)
    items: tuple  # data.tasks.Example or data.mc.MCItem
    halves: dict[str, tuple[int, ...]]
    majority: float  # the majority-answer rate of the held-out half (`survey.majority`)


def eval_kind(path: Path) -> str:
    """"tasks" or "facts", from the first row's columns; a one-line error for a file that is neither."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise MergeabilityError(f"--eval {path} {what}: pass {EVAL_KINDS} per adapter")
    first = next((row for _, row in read_rows(path)), None)
    if first is None:
        raise MergeabilityError(f"--eval {path}: the file has no rows")
    if {"input", "output"} <= set(first):
        return "tasks"
    if set(REQUIRED) <= set(first):
        return "facts"
    raise MergeabilityError(f"--eval {path} is neither {EVAL_KINDS}: its columns are "
                            f"{', '.join(map(str, list(first)[:8]))}")


def mc_items(path: Path, facts, answers: Sequence[str], seed: int) -> list:
    """Facts as multiple-choice items; distractors come from the answers of every --eval fact file (seeded)."""
    cfg = ExampleData()
    n_options = min(cfg.n_options, len({alias_key(a) for a in answers}))
    if n_options < 2:
        raise MergeabilityError(f"--eval {path}: the fact files hold fewer than 2 distinct answers, too few for "
                                "multiple choice: add facts with other answers")
    try:
        return build_items(facts, pools={"any": list(answers)}, n_options=n_options, k_shot=cfg.k_shot,
                           distractors="any", seed=seed)
    except MergeabilityError:
        raise MergeabilityError(f"--eval {path}: too few distinct answers across the fact files for "
                                f"{n_options}-option questions: add facts with other answers") from None


def split_halves(n: int, path: Path, seed: int) -> dict[str, tuple[int, ...]]:
    """A seeded shuffle of the rows, cut in two: the validation half and the held-out half (which gets an odd
    row). Keyed by the file's name, so a file is split the same way whatever the other files are."""
    if n < 2:
        raise MergeabilityError(f"--eval {path} has {n} row: plan splits each file into a validation and a "
                                "held-out half, so it needs at least 2 (far more for a useful answer)")
    order = list(range(n))
    rng(seed, "plan-split", path.name).shuffle(order)
    return {VAL: tuple(sorted(order[: n // 2])), HELD: tuple(sorted(order[n // 2:]))}


def answer_examples(items: Sequence) -> list[Example]:
    """Items as Examples whose references are the accepted answers: what `survey.majority` counts."""
    return [it if isinstance(it, Example) else Example(it.id, it.prompt, (it.fact.obj, *it.fact.possible_answers))
            for it in items]


def load_eval_sets(paths: Sequence[Path], seed: int, max_test: int | None) -> list[EvalSet]:
    """Every --eval file read (a one-line error names the file that is not a task or a fact file), at most
    `max_test` rows of each (a seeded sample), split into halves."""
    kinds = [eval_kind(Path(p)) for p in paths]
    facts = {Path(p): load_file(p) for p, k in zip(paths, kinds) if k == "facts"}
    answers = sorted({f.obj for fs in facts.values() for f in fs})
    out = []
    for p, kind in zip(map(Path, paths), kinds):
        items = read_split(p) if kind == "tasks" else mc_items(p, facts[p], answers, seed)
        if max_test is not None and len(items) > max_test:
            keep = sorted(rng(seed, "plan-sample", p.name).sample(range(len(items)), max_test))
            items = [items[i] for i in keep]
        halves = split_halves(len(items), p, seed)
        rate = majority(answer_examples([items[i] for i in halves[HELD]]))[1]
        out.append(EvalSet(p, kind, tuple(items), halves, rate))
    return out


# ------------------------------------------------------------------------------------------------ evaluation


class Evaluator(Protocol):
    def accuracy(self, i: int, update: Update | None, split: str) -> float:
        """Accuracy on adapter i's eval file, `split` half, with `update` added to the base model (None: base)."""


@dataclass(frozen=True)
class ModelEvaluator:
    """Exact match for task files (`evaluate_task`), gold-ranked-first for fact files (`PlainScorer`)."""

    lm: object  # models.LoadedModel
    sets: tuple[EvalSet, ...]

    def accuracy(self, i: int, update: Update | None, split: str) -> float:
        s = self.sets[i]
        items = [s.items[j] for j in s.halves[split]]
        model, tok = self.lm.model, self.lm.tokenizer
        if s.kind == "tasks":
            return evaluate_task(model, tok, items, update)[0]
        with applied(model, update) if update is not None else contextlib.nullcontext():
            scores = PlainScorer(model, tok).score([(it, None) for it in items])
        return sum(sc.gold_rank == 0 for sc in scores) / len(scores)


def retention(merged: float, alone: float) -> float | None:
    """merged / alone accuracy; None where the adapter alone gets nothing right (nothing to keep)."""
    return merged / alone if alone > 0 else None


def worst(ret: Sequence[float | None]) -> float | None:
    measured = [r for r in ret if r is not None]
    return min(measured) if measured else None


def all_survive(ret: Sequence[float | None]) -> bool:
    return all(r is None or r >= SURVIVES for r in ret)


# ---------------------------------------------------------------------------------------------------- merges


@dataclass(frozen=True)
class Merged:
    update: Update
    members: tuple[int, ...]  # which adapters it merges
    weights: tuple[float, ...]  # one per member, mean 1 (equal weights are the plain merge, for every method)
    energy: float | None = None  # the share of ‖ΔW‖² kept by --max-rank truncation; None without it


@dataclass(frozen=True)
class Merging:
    """Merges of any subset of the adapters with any weights, each truncated to `max_rank` when given."""

    updates: tuple[Update, ...]
    merger: object
    max_rank: int | None = None

    def __call__(self, members: Sequence[int], weights: Sequence[float] | None = None) -> Merged:
        members = tuple(members)
        w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
        w = tuple(x * len(w) / sum(w) for x in w)
        if len(members) == 1:  # the rest of a pair: served as it is, nothing to merge
            u = self.updates[members[0]]
            merged = Update(u.modules, u.base_model, {"merge": {"method": None, "weights": [1.0], "n_updates": 1}})
        else:
            try:
                merged = self.merger.merge([self.updates[i] for i in members], list(w))
            except torch.linalg.LinAlgError as e:
                raise MergeabilityError(f"the merge failed ({one_line(e)}): check the adapters' scales") from None
            if not all(representable(m) for m in merged.modules.values()):
                raise MergeabilityError("the merge overflows to infinite values: check the adapters' scales")
        if self.max_rank is None:
            return Merged(merged, members, w)
        merged, energy = truncate(merged, self.max_rank)
        return Merged(merged, members, w, energy)


@dataclass(frozen=True)
class Progressing:
    """An evaluator that advances a progress bar once per evaluation, the unit of a plan's work."""

    ev: Evaluator
    bar: object  # console.Bars.stage(...)

    def accuracy(self, i: int, update: Update | None, split: str) -> float:
        acc = self.ev.accuracy(i, update, split)
        self.bar.advance()
        return acc


def fix_evaluations(k: int) -> int:
    """At most how many evaluations the fixes take: base-accuracy weights and leaving one out are judged on
    held-out (K and K − 1), the search tries up to SEARCH_MERGES · K merges on validation (K each) and its best on
    held-out (K)."""
    return k + (SEARCH_MERGES * k + 1) * k + k - 1


def merged_accuracy(ev: Evaluator, merged: Merged, split: str) -> list[float]:
    return [ev.accuracy(i, merged.update, split) for i in merged.members]


# ----------------------------------------------------------------------------------------------------- fixes


@dataclass(frozen=True)
class Fix:
    """A proposed fix as verified on the held-out halves: per adapter (None for the one left out)."""

    name: str
    kind: str  # KEEP_ALL | LEAVE_ONE_OUT
    retention: tuple[float | None, ...]  # held-out; None: left out, or no alone accuracy to keep
    accuracy: tuple[float | None, ...] = ()  # held-out merged accuracy
    weights: tuple[float, ...] = ()  # per adapter, mean 1 over the merged ones (0 for the one left out)
    left_out: int | None = None
    merges: int = 1
    note: str = ""
    merged: Merged | None = field(default=None, repr=False, compare=False)

    @property
    def energy(self) -> float | None:
        return self.merged.energy if self.merged is not None else None


@dataclass(frozen=True)
class Measured:
    """Accuracies per split ({VAL: [...], HELD: [...]}), one per adapter, and the evaluator they came from."""

    ev: Evaluator
    base: dict[str, list[float]]
    alone: dict[str, list[float]]

    def retention(self, merged: Merged, accuracy: Sequence[float], split: str) -> tuple[float | None, ...]:
        """Per adapter (all of them): the merged members' retentions, None for the others."""
        by = dict(zip(merged.members, accuracy))
        return tuple(retention(by[i], a) if i in by else None for i, a in enumerate(self.alone[split]))


def verified(m: Measured, name: str, kind: str, merged: Merged, merges: int, note: str = "") -> Fix:
    """A fix judged on the held-out halves: one evaluation per merged adapter."""
    acc = dict(zip(merged.members, merged_accuracy(m.ev, merged, HELD)))
    k = len(m.alone[HELD])
    weights = dict(zip(merged.members, merged.weights))
    left = [i for i in range(k) if i not in acc]
    return Fix(name, kind, m.retention(merged, [acc[i] for i in merged.members], HELD),
               tuple(acc.get(i) for i in range(k)), tuple(weights.get(i, 0.0) for i in range(k)),
               left[0] if left else None, merges, note, merged)


def base_accuracy_fix(m: Measured, merging: Merging) -> Fix:
    """§6: softmax((1 − base accuracy)/T), T = 1, from the validation halves: adapters the base model knows
    least weigh most."""
    w = base_accuracy_weights(m.base[VAL], temperature=1.0)
    return verified(m, "base-accuracy weights", KEEP_ALL, merging(range(len(w)), w), 1,
                    "softmax((1 − base accuracy)/1) on the validation halves")


def search_weights(m: Measured, merging: Merging, start: Merged,
                   score: float | None) -> tuple[Merged, int, list[float | None]]:
    """Maximin coordinate search on the validation halves: from equal weights, try each adapter's weight × 2 and
    × 0.5 (renormalised) and keep a change when the worst validation retention improves; rounds until one changes
    nothing or the budget of SEARCH_MERGES · K merges is spent. `score` is the start's worst validation retention.
    (best merge, merges used, worst retention after each kept change)."""
    k = len(start.members)
    best = start
    trace, used, changed = [score], 0, True
    while changed and used < SEARCH_MERGES * k:
        changed = False
        for i in range(k):
            for factor in SEARCH_FACTORS:
                if used >= SEARCH_MERGES * k:
                    break
                w = [x * factor if j == i else x for j, x in enumerate(best.weights)]
                cand = merging(range(k), w)
                used += 1
                got = worst(m.retention(cand, merged_accuracy(m.ev, cand, VAL), VAL))
                if got is not None and got > score:
                    best, score, changed = cand, got, True
                    trace.append(score)
                    break  # the other factor would only undo this one
    return best, used, trace


def maximin_fix(m: Measured, merging: Merging, plain: Merged, plain_val: Sequence[float | None]) -> Fix:
    """The searched weights, judged on held-out (one more evaluation; the search's merge is reused)."""
    best, used, trace = search_weights(m, merging, plain, worst(plain_val))
    k = len(plain.members)
    note = (f"search on the validation halves: {used} merges of a budget of {SEARCH_MERGES}·K = {SEARCH_MERGES * k}"
            f"; worst validation retention {' → '.join(fmt(t) for t in trace)}")
    return verified(m, "maximin weights", KEEP_ALL, best, used, note)


def leave_out_fix(m: Measured, merging: Merging, plain_val: Sequence[float | None], names: Sequence[str]) -> Fix:
    """Merge all but the adapter with the worst validation retention, which is served on its own."""
    scored = [(r, i) for i, r in enumerate(plain_val) if r is not None]
    out = min(scored)[1]
    rest = [i for i in range(len(plain_val)) if i != out]
    return verified(m, f"leave out {names[out]}", LEAVE_ONE_OUT, merging(rest), 1 if len(rest) > 1 else 0,
                    f"{names[out]} (worst validation retention) served separately")


def propose_fixes(m: Measured, merging: Merging, plain: Merged, plain_val: Sequence[float | None],
                  names: Sequence[str]) -> list[Fix]:
    """The three fixes, each verified by a merge; `plain_val` the plain merge's validation retentions. The search
    and leaving one out need some alone accuracy to keep on a validation half; without any they are left out."""
    fixes = [base_accuracy_fix(m, merging)]
    if worst(plain_val) is not None:
        fixes += [maximin_fix(m, merging, plain, plain_val), leave_out_fix(m, merging, plain_val, names)]
    return fixes


@dataclass(frozen=True)
class Choice:
    fix: str | None  # the recommended fix's name; None: the plain merge stands
    reason: str


def choose(plain: Sequence[float | None], fixes: Sequence[Fix]) -> Choice:
    """`RULE`, on held-out retentions: pure, so that it can be checked on made-up numbers."""
    if all_survive(plain):
        return Choice(None, "every adapter survives the plain merge: nothing to fix")
    keep = [f for f in fixes if f.kind == KEEP_ALL]
    working = [f for f in keep if all_survive(f.retention)]
    if working:
        best = max(working, key=lambda f: _rank(worst(f.retention)))
        return Choice(best.name, "it keeps every adapter and every one survives on held-out")
    loo = [f for f in fixes if f.kind == LEAVE_ONE_OUT and all_survive(f.retention)]
    if loo:
        return Choice(loo[0].name, "no keep-all fix makes every adapter survive; with one adapter served "
                                   "separately every remaining one does")
    base = worst(plain)
    better = [f for f in keep if base is not None and worst(f.retention) is not None and worst(f.retention) > base]
    if better:
        best = max(better, key=lambda f: worst(f.retention))
        return Choice(best.name, f"no fix makes every adapter survive; it raises the worst held-out retention from "
                                 f"{fmt(base)} to {fmt(worst(best.retention))}")
    return Choice(None, "no fix makes every adapter survive or beats the plain merge's worst retention")


def _rank(x: float | None) -> float:
    return -math.inf if x is None else x


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Prepared:
    """Everything that needs no model: read, checked and merged before the model loads."""

    req: PlanRequest
    names: tuple[str, ...]
    sets: tuple[EvalSet, ...]
    updates: tuple[Update, ...]
    merging: Merging
    plain: Merged
    model: str
    predictor: object | None
    weight_features: tuple[dict[str, float], ...]  # fro_norm, top_sv and the pool features, per adapter


@dataclass(frozen=True)
class Plan:
    prep: Prepared
    measured: Measured
    merged: dict[str, list[float]]  # the plain merge's accuracy per split (after truncation with --max-rank)
    features: tuple[dict[str, float], ...]
    predicted: tuple[float, ...] | None
    fixes: tuple[Fix, ...]
    choice: Choice

    @property
    def retention(self) -> tuple[float | None, ...]:
        return self.measured.retention(self.prep.plain, self.merged[HELD], HELD)

    def chosen(self) -> Fix | None:
        return next((f for f in self.fixes if f.name == self.choice.fix), None)


def check_request(req: PlanRequest) -> None:
    """What can be checked before any file is read."""
    if len(req.adapters) < 2:
        raise MergeabilityError(f"plan needs at least two adapters to merge, got {len(req.adapters)}")
    if len(req.evals) != len(req.adapters):
        raise MergeabilityError(f"got {len(req.evals)} --eval files for {len(req.adapters)} adapters: pass one per "
                                "adapter, in the same order")
    if req.max_rank is not None and req.max_rank <= 0:
        raise MergeabilityError(f"--max-rank must be a positive integer, got {req.max_rank}")
    if req.max_test is not None and req.max_test < 2:
        raise MergeabilityError(f"--max-test must be at least 2 (each file is split into a validation and a "
                                f"held-out half), got {req.max_test}")
    check_distinct(req.adapters)
    if req.out is not None:
        check_out(req.out, req.adapters, req.force)
    if req.json is not None:
        if Path(req.json).is_dir():
            raise MergeabilityError(f"--json {req.json} is a directory: pass a file path")
        check_creatable(req.json, "--json")
    if req.predictor is not None and not Path(req.predictor).is_dir():
        raise MergeabilityError(f"--predictor {req.predictor} is not a directory: pass the run directory where "
                                "`mergeability predict` saved a predictor")


def load_checked_predictor(run_dir: Path):
    """The saved predictor; a one-line error naming a feature it reads that plan cannot compute."""
    predictor = load_predictor(Path(run_dir))
    missing = [f for f in predictor.features if f not in FEATURES]
    if missing:
        raise MergeabilityError(f"the predictor in {run_dir} reads the feature {missing[0]!r}, which plan cannot "
                                f"compute (it computes {', '.join(FEATURES)}): use a predictor fitted on those")
    return predictor


def base_model_of(names: Sequence[str], updates: Sequence[Update], model: str | None) -> str:
    """The base model every adapter targets (or --model, which they must fit)."""
    bases = {u.base_model for u in updates if u.base_model}
    if len(bases) > 1:
        pairs = ", ".join(f"{n}: {u.base_model}" for n, u in zip(names, updates) if u.base_model)
        raise MergeabilityError(f"the adapters are for different base models ({pairs}): merge adapters trained on "
                                "one base model")
    model = model or next(iter(bases), None)
    if not model:
        raise MergeabilityError("cannot tell the adapters' base model: pass --model")
    check_bases(((n, u.base_model) for n, u in zip(names, updates)), model)
    return model


def display_names(adapters: Sequence[Path]) -> tuple[str, ...]:
    """Each adapter's directory name; the whole path where two share a name."""
    short = [Path(a).name or str(a) for a in adapters]
    return tuple(s if short.count(s) == 1 else str(a) for s, a in zip(short, adapters))


def weight_features(updates: Sequence[Update], density: float = FEATURE_DENSITY) -> list[dict[str, float]]:
    """‖ΔW‖_F, σ_max and the pool-relative interference features, k = (K − 1) · the largest rank: the directions
    the other adapters can occupy."""
    rank = max(getattr(d, "rank", min(d.shape)) for u in updates for d in u.modules.values())
    pool = pool_features({str(i): u for i, u in enumerate(updates)}, k=(len(updates) - 1) * rank, density=density)
    return [{"fro_norm": u.fro_norm(), "top_sv": u.top_singular_value(),
             **{k: float(pool[str(i)][k]) for k in POOL_FEATURES}} for i, u in enumerate(updates)]


def prepare(req: PlanRequest) -> Prepared:
    """Every check, every file read and the plain merge: all before the model loads."""
    check_request(req)
    cfg = MergeConfig()
    method = req.method or cfg.method
    params = {**(cfg.params if req.method is None else {}), **parse_params(method, req.params)}
    merger = get_method(method, **params)
    predictor = load_checked_predictor(req.predictor) if req.predictor is not None else None
    sets = load_eval_sets(req.evals, req.seed, req.max_test)
    names = display_names(req.adapters)
    updates = tuple(load_adapters(req.adapters))
    model = base_model_of(names, updates, req.model)
    check_updates(updates)
    merging = Merging(updates, merger, req.max_rank)
    plain = merging(range(len(updates)))
    return Prepared(req, names, tuple(sets), updates, merging, plain, model, predictor,
                    tuple(weight_features(updates)))


def measure(prep: Prepared, ev: Evaluator, bars=None) -> Plan:
    """Base, alone and plain-merge accuracy on both halves; fixes when an adapter does not survive; the choice.
    `bars` (console.Bars): a "measure" bar of 6 K evaluations, and a "fixes" bar up to `fix_evaluations`."""
    k = len(prep.updates)
    ev_m = ev if bars is None else Progressing(ev, bars.stage("measure", 6 * k))
    base = {s: [ev_m.accuracy(i, None, s) for i in range(k)] for s in (VAL, HELD)}
    m = Measured(ev_m, base, {s: [ev_m.accuracy(i, u, s) for i, u in enumerate(prep.updates)] for s in (VAL, HELD)})
    merged = {s: merged_accuracy(ev_m, prep.plain, s) for s in (VAL, HELD)}
    plain_ret = m.retention(prep.plain, merged[HELD], HELD)
    fixes = ()
    if not all_survive(plain_ret):
        bar = None if bars is None else bars.stage("fixes", fix_evaluations(k))
        m_fix = m if bar is None else replace(m, ev=Progressing(ev, bar))
        fixes = tuple(propose_fixes(m_fix, prep.merging, prep.plain, m.retention(prep.plain, merged[VAL], VAL),
                                    prep.names))
        if bar is not None:
            bar.finish()  # the search stops when a round changes nothing: the bound is rarely reached
    features = tuple(
        {"base_acc": b, "majority_margin": b - s.majority, "ft_acc": a, "gain": a - b, **w}
        for b, a, s, w in zip(m.base[HELD], m.alone[HELD], prep.sets, prep.weight_features))
    predicted = None
    if prep.predictor is not None:
        predicted = tuple(float(x) for x in prep.predictor.predict([{f: r[f] for f in FEATURES} for r in features]))
    return Plan(prep, m, merged, features, predicted, fixes, choose(plain_ret, fixes))


def make_plan(req: PlanRequest, bars=None) -> Plan:
    prep = prepare(req)
    lm = load_model(prep.model)
    return measure(prep, ModelEvaluator(lm, prep.sets), bars)


# ------------------------------------------------------------------------------------------------ reporting


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def shares(weights: Sequence[float], left_out: int | None = None) -> str:
    """Each adapter's share of the weight, "–" for the one left out."""
    total = sum(weights)
    return "/".join("–" if i == left_out else f"{w / total:.2f}" for i, w in enumerate(weights))


def tables(plan: Plan) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the measured table, the features table and, when there are fixes, the fixes'."""
    p, m = plan.prep, plan.measured
    pred = plan.predicted or [None] * len(p.names)
    measured = [[n, f"{s.kind} {len(s.halves[VAL])}+{len(s.halves[HELD])}", fmt(m.base[HELD][i]),
                 fmt(plan.features[i]["majority_margin"]), fmt(m.alone[HELD][i]), fmt(plan.merged[HELD][i]),
                 fmt(r), "n/a" if r is None else "yes" if r >= SURVIVES else "NO", "–" if x is None else fmt(x)]
                for i, (n, s, r, x) in enumerate(zip(p.names, p.sets, plan.retention, pred))]
    level = f" ({p.predictor.level}-level)" if p.predictor is not None else ""
    out = [(f"{p.merging.merger.name} merge of {len(p.names)} adapters: accuracy on the held-out halves",
            ["adapter", "eval (val+held)", "base", "base−maj.", "alone", "merged", "retention", "survives",
             f"predicted{level}"], measured)]
    feats = [[n, *(fmt(f[k], 3) for k in ("fro_norm", "top_sv", *POOL_FEATURES))]
             for n, f in zip(p.names, plan.features)]
    out.append(("features behind the prediction", ["adapter", "‖ΔW‖_F", "σ_max", "cos rest", "pair cos",
                                                    "sub. energy", "overlap", "sign confl.", "eff. rank"], feats))
    if plan.fixes:
        rows = [[f.name, shares(f.weights, f.left_out), " ".join(fmt(r) for r in f.retention),
                 fmt(worst(f.retention)), "yes" if all_survive(f.retention) else "no", str(f.merges)]
                for f in plan.fixes]
        out.append(("fixes, verified on the held-out halves", ["fix", "weights", "retention per adapter",
                                                              "worst", "all survive", "merges"], rows))
    return out


def notes(plan: Plan) -> list[str]:
    """Lines under the tables: the predictor, truncation, n/a retentions, the search and the choice rule."""
    p, lines = plan.prep, []
    if p.predictor is None:
        lines.append("predicted: – (no --predictor): run `mergeability predict RUN_DIR` on a finished run and pass "
                     "--predictor RUN_DIR")
    if p.req.max_rank is not None:
        lines.append(f"--max-rank {p.req.max_rank}: the merge keeps {p.plain.energy:.1%} of its energy; merged "
                     "accuracy and retention are measured after truncation")
    for n, a in zip(p.names, plan.measured.alone[HELD]):
        if a == 0:
            lines.append(f"{n}: alone accuracy on its held-out half is 0, so its retention is n/a (not counted)")
    lines += [f"{f.name}: {f.note}" for f in plan.fixes if f.note]
    if plan.fixes:
        lines.append(f"choice rule: {RULE}")
    return lines


def verdict(plan: Plan) -> str:
    p, ret = plan.prep, plan.retention
    counted = [(n, r) for n, r in zip(p.names, ret) if r is not None]
    lost = [n for n, r in counted if r < SURVIVES]
    head = (f"verdict: {len(counted) - len(lost)} of {len(counted)} adapters survive the {p.merging.merger.name} "
            f"merge (retention ≥ {SURVIVES:g} on held-out)")
    if not lost:
        return head + "; nothing to fix"
    do_not = "does not" if len(lost) == 1 else "do not"
    if plan.choice.fix is None:
        return f"{head}; {', '.join(lost)} {do_not}; no fix recommended: {plan.choice.reason}"
    return f"{head}; {', '.join(lost)} {do_not}; use {plan.choice.fix}: {plan.choice.reason}"


def versions() -> dict[str, str]:
    import transformers  # already loaded with the model; imported here only to read its version

    return {"mergeability": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def fix_record(f: Fix, names: Sequence[str]) -> dict:
    return {"name": f.name, "kind": f.kind, "weights": list(f.weights), "retention": list(f.retention),
            "accuracy": list(f.accuracy), "worst": worst(f.retention), "all_survive": all_survive(f.retention),
            "left_out": None if f.left_out is None else names[f.left_out], "merges": f.merges,
            "energy_kept": f.energy, "note": f.note}


def adapter_records(plan: Plan) -> list[dict]:
    p, m = plan.prep, plan.measured
    pred = plan.predicted or [None] * len(p.names)
    return [{"name": n, "path": str(a), "eval": str(s.path), "format": s.kind, "n_validation": len(s.halves[VAL]),
             "n_held_out": len(s.halves[HELD]), "majority": s.majority,
             "base": {VAL: m.base[VAL][i], HELD: m.base[HELD][i]},
             "alone": {VAL: m.alone[VAL][i], HELD: m.alone[HELD][i]},
             "merged": {VAL: plan.merged[VAL][i], HELD: plan.merged[HELD][i]}, "retention": r,
             "survives": None if r is None else r >= SURVIVES, "features": plan.features[i], "predicted": x}
            for i, (n, a, s, r, x) in enumerate(zip(p.names, p.req.adapters, p.sets, plan.retention, pred))]


def plan_record(plan: Plan) -> dict:
    """Everything the plan measured and decided, for --json."""
    p = plan.prep
    pred = None if p.predictor is None else {"path": str(p.req.predictor), "level": p.predictor.level,
                                             "features": list(p.predictor.features)}
    return jsonable({
        "adapters": adapter_records(plan), "model": p.model, "method": p.merging.merger.name,
        "params": params_of(p.merging.merger), "max_rank": p.req.max_rank, "energy_kept": p.plain.energy,
        "survives_at": SURVIVES, "seed": p.req.seed, "max_test": p.req.max_test, "predictor": pred,
        "search_budget": f"{SEARCH_MERGES} merges per adapter", "fixes": [fix_record(f, p.names) for f in plan.fixes],
        "choice": {"fix": plan.choice.fix, "reason": plan.choice.reason}, "rule": RULE, "verdict": verdict(plan),
        "versions": versions()})


def chosen_update(plan: Plan) -> Update:
    """The merge to write: the chosen fix's, or the plain merge; its provenance names the sources and the plan."""
    p, fix = plan.prep, plan.chosen()
    merged = fix.merged if fix is not None else p.plain
    meta = dict(merged.update.meta)
    meta["merge"] = {**meta.get("merge", {}), "method": p.merging.merger.name, "params": params_of(p.merging.merger),
                     "weights": list(merged.weights), "sources": [str(p.req.adapters[i]) for i in merged.members]}
    meta["plan"] = jsonable({"choice": plan.choice.fix or "the plain merge", "reason": plan.choice.reason,
                           "rule": RULE, "left_out": None if fix is None or fix.left_out is None
                           else str(p.req.adapters[fix.left_out]), "max_rank": p.req.max_rank,
                           "energy_kept": merged.energy, "seed": p.req.seed})
    return replace(merged.update, meta=meta, base_model=merged.update.base_model or p.model)


def write_outputs(plan: Plan) -> list[Path]:
    """--json (atomically) and --out (the chosen merge, `save_update`); the paths written."""
    req, written = plan.prep.req, []
    if req.json is not None:
        Path(req.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(req.json, plan_record(plan))
        written.append(Path(req.json))
    if req.out is not None:
        written.append(save_update(chosen_update(plan), req.out, force=req.force))
    return written
