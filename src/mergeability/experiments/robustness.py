"""A.3, A.13-A.14: twice the trials (M more, same N), and runs with other numbers of partners (N/2 by default;
the study preset adds N = 25)."""

from __future__ import annotations

from dataclasses import dataclass

from mergeability.errors import MergeabilityError
from mergeability.experiments.context import Context, add_trials, kept_updates


def half(partners: int) -> int:
    """The N of the half-partners run."""
    return max(1, partners // 2)


@dataclass(frozen=True)
class Robustness:
    name = "robustness"
    kind = "examples"
    partners: tuple[int, ...] = ()  # the other N values to score at; () = N/2 only

    def __post_init__(self):
        if any(not isinstance(n, int) or n < 1 for n in self.partners):
            raise MergeabilityError(f"robustness: partner counts must be positive integers, got {self.partners}")

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        m = ctx.cfg.merge
        add_trials(ctx, updates, f"M={2 * m.trials}", console, method=m.method, params=m.params,
                   trials=2 * m.trials, partners=m.partners)
        for n in self.partners or (half(m.partners),):
            if n != m.partners:
                if n >= len(updates):
                    raise MergeabilityError(f"robustness: N = {n} needs more than {n} kept updates; the run has "
                                            f"{len(updates)}")
                add_trials(ctx, updates, f"N={n}", console, method=m.method, params=m.params, trials=m.trials,
                           partners=n)
