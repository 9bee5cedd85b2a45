"""The study: a run sized to settle the directional claims on a CPU, then every experiment the claims table needs.
A recipe of library calls; each step resumes, so an interrupted study continues where it stopped."""

from __future__ import annotations

from pathlib import Path

from mergeability.experiments import run_experiment
from mergeability.experiments.algorithms import Algorithms
from mergeability.experiments.locality import Locality
from mergeability.experiments.robustness import Robustness, half
from mergeability.pipelines import run_examples
from mergeability.run import open_run

STUDY_N = 25  # the largest N of the N-robustness check (N/2, N and this)
STUDY_SCORED = 50  # updates scored at 2M and the other N values: see `study_experiments`


def study_experiments(cfg, kept: int) -> list:
    """What the claims table needs beyond the run's own trials: other methods (§5.2, A.9), M and N (A.3), locality
    (§5.1). N = STUDY_N only where more than STUDY_N updates were kept; 2M and the other N values score a seeded
    sample of STUDY_SCORED updates: on the 208-update Wikidata study their agreement with the run's scores is
    ρ ≈ 0.7 whether 80 or 50 are sampled (within relation, CI lower bounds 0.44-0.60 at 50, Holm p 0.011), and
    N = 25 costs 5× a trial at N = 10 (8 of the study's 47 minutes at 80). KnOTS settings are their own
    experiment (`knots-settings`): it costs three times the run's trials."""
    n = cfg.merge.partners
    others = tuple(sorted(x for x in {half(n), STUDY_N} if x != n and x < kept))
    return [Algorithms(), Robustness(partners=others, scored=STUDY_SCORED), Locality()]


def run_study(cfg, out: Path, *, resume: bool, console) -> None:
    """The run (screen, train, trials), then each study experiment on it."""
    run_examples(cfg, out, resume=resume, console=console)
    _, store = open_run(out, lock=False)
    kept = len(store.kept_updates())
    store.close()
    for experiment in study_experiments(cfg, kept):
        console.print(f"study: experiment {experiment.name}")
        run_experiment(experiment, out, console)
