"""§6, Fig. 7: merge tasks the base model knows little with tasks it knows well, plainly and with base-accuracy
weights softmax((1 − acc)/T), and compare what each task keeps. The paper shows one set of four tasks; this
merges many distinct sets, sweeps T, and applies the weights inside every merge method.

Selection, as the paper's: weak tasks are those the base model barely knows (base ≤ `weak_max`) and whose adapter
learned them (fine-tuned ≥ the run's threshold); strong tasks are those the base model knows (base ≥ `strong_min`)
by more than answering the majority class (base ≥ majority rate + `majority_margin`), fine-tuned ≥ threshold. An
adapter that barely beats the base model learned nothing a merge could lose, so it is dropped whatever its group:
it must gain `min_gain`, or half of what the base model gets wrong where that is less (a task at base 0.96 can gain
at most 0.04). The majority rate is the survey's (`pipelines.survey.majority`) on the run's test items.

Sets: every distinct combination of `low` weak and `high` strong tasks when there are at most `sets`, else a seeded
sample of `sets` distinct ones. Each is merged by every method plainly and with the weights at `temperature`, the
mean merge also at each `sweep` T; TIES and KnOTS use the `ties_weighting` rule (`merging.ties.disjoint_merge`).
For the report's first gate, each task used is also merged alone at scale s (task arithmetic with λ = s on one
adapter: how `tasks survey` measures it) at the survey's scales and at the shares a set gives a task: 1/(low + high)
plain, 1/low the most weights give a weak task.

Nothing here decides: the experiment records its plan (meta `weighted_plan`: spec, per-task selection, sets) and
rows; the report applies the gates and the rule. A selection too small for one set is recorded with no merges.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass

from mergeability.errors import MergeabilityError
from mergeability.experiments.context import Context, run_merge_sets
from mergeability.merging import base_accuracy_weights, get_method
from mergeability.merging.ties import Weighting
from mergeability.pipelines.survey import SCALES, majority
from mergeability.pipelines.tasks import test_examples
from mergeability.updates import load_update

SCALE_NAME = "weighted_scale"  # the rows of the adapters alone at scale s, apart from the merges' rows
WEIGHTED_BY_RULE = ("ties", "knots")  # the methods whose weighting rule is a parameter (`ties_weighting`)


@dataclass(frozen=True)
class Weighted:
    name = "weighted"
    kind = "tasks"
    sets: int = 40  # distinct task sets: all combinations when there are at most this many, else a seeded sample
    low: int = 2  # weak tasks per set
    high: int = 2  # strong tasks per set
    temperature: float = 0.5  # T of the weights for every method
    sweep: tuple[float, ...] = (0.1, 0.25, 1.0, 2.0)  # other T, with the mean merge
    methods: tuple[str, ...] = ("mean", "ties", "knots")
    weak_max: float = 0.1  # weak: base accuracy at most this (the paper's "low")
    strong_min: float = 0.8  # strong: base accuracy at least this (the paper's "high") ...
    majority_margin: float = 0.1  # ... and above the majority-class rate by this much (not a majority guesser)
    min_gain: float = 0.1  # fine-tuned − base below this (or below half the base's errors) drops a task
    # TIES/KnOTS: "all" normalises the weights over every update so they do not cancel in the disjoint mean;
    # "agreeing" is the methods' default, where they mostly cancel (see merging.ties.disjoint_merge)
    ties_weighting: Weighting = "all"

    def __post_init__(self):
        if any(not (t > 0 and math.isfinite(t)) for t in (self.temperature, *self.sweep)):
            raise MergeabilityError(f"temperatures must be > 0, got {[self.temperature, *self.sweep]}")
        if self.sets < 1 or self.low < 1 or self.high < 1:
            raise MergeabilityError("--sets, --low and --high must be at least 1")
        for key in ("weak_max", "strong_min", "majority_margin", "min_gain"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise MergeabilityError(f"weighted: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.ties_weighting not in ("agreeing", "all"):
            raise MergeabilityError(f"weighted: ties_weighting must be agreeing or all, got {self.ties_weighting!r}")
        for m in self.methods:
            get_method(m, **self.params(m))

    def params(self, method: str) -> dict:
        """The merge parameters of `method`'s rows: the weighting rule where the method has one."""
        return {"weighting": self.ties_weighting} if method in WEIGHTED_BY_RULE else {}

    def shares(self) -> tuple[float, float]:
        """(a task's share in a plain mean merge of a set, the most weights give a weak task): gate (a)'s scales."""
        return 1 / (self.low + self.high), 1 / self.low

    def run(self, ctx: Context, console) -> None:
        cfg, store = ctx.cfg, ctx.store
        rows = {r["name"]: r for r in store.task_rows()}
        prep = ctx.prepared()
        rates = {t.name: majority(test_examples(cfg, t))[1] for t in prep.tasks if t.name in rows}
        selection = select_tasks(rows, rates, self, cfg.data.threshold)
        weak, strong = members(selection, "weak"), members(selection, "strong")
        sets = task_sets(weak, strong, self, cfg.seed)
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        store.set_meta("weighted_plan", {"spec": spec, "threshold": cfg.data.threshold, "selection": selection,
                                         "sets": sets})  # one write: the plan the rows belong to
        if not sets:
            console.print(f"weighted: not testable here: {too_few(weak, strong, self)}; no merges run")
            return
        used = sorted({n for w, s in sets for n in w + s})
        updates = {n: load_update(ctx.run_dir / rows[n]["path"]) for n in used}

        def payload(u):
            if u.get("task"):  # an adapter alone at scale s
                return ("task_arithmetic", {"lam": u["s"]}, [u["task"]], None, False)
            names = u["weak"] + u["strong"]
            w = None if u["T"] is None else base_accuracy_weights([rows[n]["base_acc"] for n in names], u["T"])
            return (u["method"], u["params"], names, w, False)

        def result(p, outcomes):
            return {"acc": {n: o.correct for n, o in zip(p[2], outcomes)}, "weights": p[3]}

        run_merge_sets(ctx, SCALE_NAME, scale_units(self, used), updates, console, payload, result)
        run_merge_sets(ctx, self.name, units(self, sets), updates, console, payload, result)


def needed_gain(base: float, min_gain: float) -> float:
    """What an adapter must add to the base model's accuracy to count as having learned its task: `min_gain`, or
    half the base model's errors where that is less (0 at base 1.0, where the adapter need only keep it)."""
    return min(min_gain, (1.0 - base) / 2)


def classify(base: float, ft: float, rate: float | None, spec: Weighted, threshold: float) -> tuple[str | None, str]:
    """(group or None, why) of one task under the selection rules."""
    if ft < threshold:
        return None, f"fine-tuned {ft:.2f} < threshold {threshold:g}"
    need = needed_gain(base, spec.min_gain)
    if ft < base:
        return None, f"fine-tuned {ft:.2f} is below base {base:.2f}: the adapter unlearned the task"
    if ft - base < need:
        return None, f"fine-tuned {ft:.2f} gains < {need:.2f} over base {base:.2f}: the adapter learned little"
    if base <= spec.weak_max:
        return "weak", f"base {base:.2f} ≤ {spec.weak_max:g}"
    if base < spec.strong_min:
        return None, f"base {base:.2f} is neither ≤ {spec.weak_max:g} nor ≥ {spec.strong_min:g}"
    if rate is None:
        return None, "no test items to measure its majority-class rate"
    if base < rate + spec.majority_margin:
        return None, f"base {base:.2f} is within {spec.majority_margin:g} of the majority-class rate {rate:.2f}"
    return "strong", f"base {base:.2f} ≥ {spec.strong_min:g}, majority-class rate {rate:.2f}"


def select_tasks(rows: dict[str, dict], rates: dict[str, float], spec: Weighted, threshold: float) -> dict[str, dict]:
    """Every task's numbers, group (weak, strong or None) and why, by name."""
    out = {}
    for name, r in sorted(rows.items()):
        base, ft = r["base_acc"], r["ft_acc"]
        group, why = classify(base, ft, rates.get(name), spec, threshold)
        out[name] = {"base": base, "ft": ft, "majority": rates.get(name), "group": group, "why": why}
    return out


def members(selection: dict[str, dict], group: str) -> list[str]:
    return sorted(n for n, s in selection.items() if s["group"] == group)


def too_few(weak: list[str], strong: list[str], spec: Weighted) -> str:
    """Why no set can be formed ('' when one can)."""
    short = [f"{len(g)} {label} task{'s' * (len(g) != 1)} (a set needs {k})"
             for g, k, label in ((weak, spec.low, "weak"), (strong, spec.high, "strong")) if len(g) < k]
    return ", ".join(short)


def task_sets(weak: list[str], strong: list[str], spec: Weighted, seed: int) -> list[tuple[list[str], list[str]]]:
    """Distinct (weak, strong) sets: all combinations when there are at most `spec.sets`, else a seeded sample of
    `spec.sets` of them (the same seed and tasks give the same sets). [] when the groups are too small."""
    if too_few(weak, strong, spec):
        return []
    total = math.comb(len(weak), spec.low) * math.comb(len(strong), spec.high)
    rng = random.Random(f"{seed}/weighted")
    if total <= 4 * spec.sets:  # few enough to list: sample without rejection
        combos = list(itertools.product(itertools.combinations(weak, spec.low),
                                        itertools.combinations(strong, spec.high)))
        chosen = combos if total <= spec.sets else rng.sample(combos, spec.sets)
        return [(list(w), list(s)) for w, s in chosen]
    seen: dict[tuple, None] = {}
    while len(seen) < spec.sets:  # more than 4× as many as wanted: a repeat is rare
        seen.setdefault((tuple(sorted(rng.sample(weak, spec.low))), tuple(sorted(rng.sample(strong, spec.high)))))
    return [(list(w), list(s)) for w, s in seen]


def scales(spec: Weighted) -> list[float]:
    """The scales of gate (a)'s curves below 1 (at 1 the adapter alone is the fine-tuned model: its ft_acc)."""
    return sorted({*SCALES, *spec.shares()} - {1.0})


def scale_units(spec: Weighted, tasks: list[str]) -> list[tuple[str, dict]]:
    return [(json.dumps(u, sort_keys=True), u) for u in ({"task": n, "s": s} for n in tasks for s in scales(spec))]


def units(spec: Weighted, sets) -> list[tuple[str, dict]]:
    """One merge each: (set, method, its parameters, T or None for the plain merge); the T sweep with the mean
    merge only."""
    out = []
    for s, (weak, strong) in enumerate(sets):
        for method in spec.methods:
            temps = [None, spec.temperature]
            temps += [t for t in spec.sweep if t != spec.temperature] if method == "mean" else []
            for T in temps:
                u = {"set": s, "method": method, "params": spec.params(method), "T": T, "weak": weak,
                     "strong": strong}
                out.append((json.dumps(u, sort_keys=True), u))
    return out
