"""A.3, A.13-A.14: twice the trials (M more, same N), and runs with other numbers of partners (N/2 by default;
the study preset adds N = 25), on all the kept updates or a seeded sample of them (`scored`)."""

from __future__ import annotations

from dataclasses import dataclass

from mergeability.errors import MergeabilityError
from mergeability.experiments.context import Context, add_trials, kept_updates, main_scores
from mergeability.seeding import rng

MIN_SCORED = 30  # the fewest updates a score comparison is reported on (the report skips fewer)


def half(partners: int) -> int:
    """The N of the half-partners run."""
    return max(1, partners // 2)


@dataclass(frozen=True)
class Robustness:
    name = "robustness"
    kind = "examples"
    partners: tuple[int, ...] = ()  # the other N values to score at; () = N/2 only
    # score the other M and N values on at most this many updates (one seeded sample; partners still come from
    # every update); None = all. Agreement of two score sets is decided with far fewer updates than the run's own
    # claims need, and a trial at N = 25 costs ~5 times one at N = 10 (a 182-update study: 18 of its 62 minutes)
    scored: int | None = None

    def __post_init__(self):
        if any(not isinstance(n, int) or n < 1 for n in self.partners):
            raise MergeabilityError(f"robustness: partner counts must be positive integers, got {self.partners}")
        if self.scored is not None and (not isinstance(self.scored, int) or self.scored < MIN_SCORED):
            raise MergeabilityError(f"robustness: scored must be an integer ≥ {MIN_SCORED}, got {self.scored!r}")

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        m = ctx.cfg.merge
        main_scores(ctx, updates)  # the run's M trials are all recorded, so M = 2M plans only trials M..2M-1
        scored = self.sample(updates, ctx.cfg.seed)
        add_trials(ctx, updates, f"M={2 * m.trials}", console, method=m.method, params=m.params,
                   trials=2 * m.trials, partners=m.partners, targets=scored, first_trial=m.trials)
        for n in self.partners or (half(m.partners),):
            if n != m.partners:
                if n >= len(updates):
                    raise MergeabilityError(f"robustness: N = {n} needs more than {n} kept updates; the run has "
                                            f"{len(updates)}")
                add_trials(ctx, updates, f"N={n}", console, method=m.method, params=m.params, trials=m.trials,
                           partners=n, targets=scored)

    def sample(self, updates: dict, seed: int) -> list[str]:
        """The updates scored at 2M and at the other N values: all, or `scored` of them drawn with the run's seed."""
        ids = sorted(updates)
        if self.scored is None or self.scored >= len(ids):
            return ids
        return sorted(rng(seed, "robustness", "scored").sample(ids, self.scored))
