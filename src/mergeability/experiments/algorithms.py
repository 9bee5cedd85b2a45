"""§5.2, A.9: the run's trials again, with the same partners, under the other merge methods."""

from __future__ import annotations

from dataclasses import dataclass

from mergeability.experiments.context import Context, add_trials, kept_updates


@dataclass(frozen=True)
class Algorithms:
    name = "algorithms"
    kind = "examples"
    methods: tuple[str, ...] = ("ties", "mean")  # besides the run's own (with their default parameters)

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        m = ctx.cfg.merge
        for method in self.methods:
            if method != m.method:
                add_trials(ctx, updates, method, console, method=method, params={}, trials=m.trials,
                           partners=m.partners)
