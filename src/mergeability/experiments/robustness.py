"""A.3, A.13-A.14: twice the trials (M more, same N), and a run with half the partners."""

from __future__ import annotations

from dataclasses import dataclass

from mergeability.experiments.context import Context, add_trials, kept_updates


def half(partners: int) -> int:
    """The N of the half-partners run."""
    return max(1, partners // 2)


@dataclass(frozen=True)
class Robustness:
    name = "robustness"
    kind = "examples"

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        m = ctx.cfg.merge
        add_trials(ctx, updates, f"M={2 * m.trials}", console, method=m.method, params=m.params,
                   trials=2 * m.trials, partners=m.partners)
        add_trials(ctx, updates, f"N={half(m.partners)}", console, method=m.method, params=m.params,
                   trials=m.trials, partners=half(m.partners))
