"""§6, Fig. 7: merge tasks the base model knows little with tasks it knows well, plainly and with base-accuracy
weights softmax((1 − acc)/T), and compare what each task keeps. The paper shows one set of four tasks; this
repeats over many random sets, sweeps T, and applies the weights inside every merge method."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass

from mergeability.errors import MergeabilityError
from mergeability.experiments.context import Context, run_merge_sets
from mergeability.merging import base_accuracy_weights, get_method
from mergeability.updates import load_update


def task_sets(base_acc: dict[str, float], spec: Weighted, seed: int) -> list[tuple[list[str], list[str]]]:
    """(weak, strong) per set: weak from the lower half of tasks by base accuracy, strong from the upper half."""
    ranked = sorted(base_acc, key=lambda n: (base_acc[n], n))
    half = len(ranked) // 2
    weak, strong = ranked[:half], ranked[len(ranked) - half :]
    if len(weak) < spec.low or len(strong) < spec.high:
        raise MergeabilityError(f"{len(ranked)} tasks cannot give {spec.low} weak and {spec.high} strong ones per "
                                "set: lower --low/--high, or lower the run's threshold to keep more tasks")
    out = []
    for s in range(spec.sets):
        rng = random.Random(f"{seed}/weighted/{s}")
        out.append((sorted(rng.sample(weak, spec.low)), sorted(rng.sample(strong, spec.high))))
    return out


def units(spec: Weighted, sets) -> list[tuple[str, dict]]:
    """One merge each: (set, method, T or None for the plain merge); the T sweep with the mean merge only."""
    out = []
    for s, (weak, strong) in enumerate(sets):
        for method in spec.methods:
            temps = [None, spec.temperature]
            temps += [t for t in spec.sweep if t != spec.temperature] if method == "mean" else []
            for T in temps:
                u = {"set": s, "method": method, "T": T, "weak": weak, "strong": strong}
                out.append((json.dumps(u, sort_keys=True), u))
    return out


@dataclass(frozen=True)
class Weighted:
    name = "weighted"
    kind = "tasks"
    sets: int = 8  # random task sets
    low: int = 2  # tasks per set from the weaker half by base accuracy
    high: int = 2  # tasks per set from the stronger half
    temperature: float = 0.5  # T of the weights for every method
    sweep: tuple[float, ...] = (0.1, 0.25, 1.0, 2.0)  # other T, with the mean merge
    methods: tuple[str, ...] = ("mean", "ties", "knots")

    def __post_init__(self):
        if any(not (t > 0 and math.isfinite(t)) for t in (self.temperature, *self.sweep)):
            raise MergeabilityError(f"temperatures must be > 0, got {[self.temperature, *self.sweep]}")
        if self.sets < 1 or self.low < 1 or self.high < 1:
            raise MergeabilityError("--sets, --low and --high must be at least 1")
        for m in self.methods:
            get_method(m)

    def run(self, ctx: Context, console) -> None:
        cfg, store = ctx.cfg, ctx.store
        rows = {r["name"]: r for r in store.task_rows()}
        names = [n for n in store.tasks_reaching(cfg.data.threshold) if n in rows]
        sets = task_sets({n: rows[n]["base_acc"] for n in names}, self, cfg.seed)
        ctx.prepared()
        updates = {n: load_update(ctx.run_dir / rows[n]["path"]) for n in {n for w, s in sets for n in w + s}}

        def payload(u):
            members = u["weak"] + u["strong"]
            w = None if u["T"] is None else base_accuracy_weights([rows[n]["base_acc"] for n in members], u["T"])
            return (u["method"], {}, members, w, False)

        def result(p, outcomes):
            return {"acc": {n: o.correct for n, o in zip(p[2], outcomes)}, "weights": p[3]}

        run_merge_sets(ctx, self.name, units(self, sets), updates, console, payload, result)
        store.set_meta("weighted_spec", {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()})
