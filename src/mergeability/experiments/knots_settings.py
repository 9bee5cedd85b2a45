"""KnOTS settings chosen on purpose: the run's trials again, with the same partners, under a grid of KnOTS's
trimming density and scaling λ. The official KnOTS configuration for Llama LoRAs is no trimming (density 1.0,
topK 100 %) and λ 0.5; the package's earlier default was density 0.2, λ 1.0. The default grid holds both, and the
two mixed settings between them (the evidence behind today's defaults: merging/knots.py, README)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mergeability.errors import MergeabilityError
from mergeability.estimate import params_key
from mergeability.experiments.context import Context, add_trials, kept_updates
from mergeability.merging import get_method

METHOD = "knots"


def setting_params(density: float, lam: float) -> dict[str, float]:
    """The KnOTS parameters of one setting, as its trials record them."""
    return {"density": density, "lam": lam}


def settings_key(density: float, lam: float, partners: int) -> str:
    """The trial key of one setting (N partners): what `run` writes and the report reads."""
    return params_key(METHOD, {**setting_params(density, lam), "partners": partners})


def setting_label(density: float, lam: float) -> str:
    return f"d={density}, λ={lam}"


def is_own_setting(merge, density: float, lam: float) -> bool:
    """Whether the run's own trials (its `merge` config section) are already this setting: method knots with
    the same resolved parameters once defaults are filled in (so {} is Knots' default density and λ)."""
    if merge.method != METHOD:
        return False
    return get_method(METHOD, **merge.params) == get_method(METHOD, **setting_params(density, lam))


def _checked(values, what: str, one: str, ok, rule: str) -> tuple[float, ...]:
    """`values` as a non-empty tuple of finite floats that satisfy `ok`, or a one-line error."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise MergeabilityError(f"knots-settings {what} must be numbers, got {values!r}") from None
    if not out:
        raise MergeabilityError(f"knots-settings needs at least one {one}")
    bad = [v for v in out if not (math.isfinite(v) and ok(v))]
    if bad:
        raise MergeabilityError(f"knots-settings {what} must be {rule}, got {bad[0]:g}")
    return out


@dataclass(frozen=True)
class KnotsSettings:
    name = "knots-settings"
    kind = "examples"
    densities: tuple[float, ...] = (0.2, 1.0)  # TIES trimming: share of aligned entries kept (1.0 = none trimmed)
    lams: tuple[float, ...] = (0.5, 1.0)  # scaling of the merged update

    def __post_init__(self):
        object.__setattr__(self, "densities", _checked(self.densities, "densities", "density",
                                                       lambda d: 0 < d <= 1, "in (0, 1]"))
        object.__setattr__(self, "lams", _checked(self.lams, "lams", "lam", lambda v: v > 0, "positive and finite"))

    def grid(self) -> list[tuple[float, float]]:
        """Every (density, λ), densities outermost."""
        return [(d, lam) for d in self.densities for lam in self.lams]

    def todo(self, merge) -> list[tuple[float, float]]:
        """The settings whose trials the run does not already hold as its own."""
        return [(d, lam) for d, lam in self.grid() if not is_own_setting(merge, d, lam)]

    def run(self, ctx: Context, console) -> None:
        updates = kept_updates(ctx)
        m = ctx.cfg.merge
        for d, lam in self.todo(m):
            add_trials(ctx, updates, setting_label(d, lam), console, method=METHOD, params=setting_params(d, lam),
                       trials=m.trials, partners=m.partners)
