"""A run directory and what every run records: the one place that creates, opens and locks one.

    RUN_DIR/
      config.yaml      the resolved config; its `kind` (examples | tasks) says which kind of run this is
      results.sqlite   the store: items or tasks, updates, trials, experiments, meta (provenance, timings)
      updates/         PEFT adapter directories the run trained
      scores.csv       one row per scored update
      report.html, report.md, figures/

Pipelines, experiments and reports all reach a run through this module and the store's methods, never
through each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mergeability.atomic import check_creatable, clear_stale
from mergeability.config import load_config, save_config
from mergeability.errors import MergeabilityError
from mergeability.estimate import params_key
from mergeability.store import Store
from mergeability.updates import Update, load_update
from mergeability.version import __version__

CONFIG, STORE, UPDATES = "config.yaml", "results.sqlite", "updates"


def check_new(out: Path, resume: bool, cfg=None, *, same_config: bool = False) -> Path:
    """`out` as a Path if a run may be written there, else a one-line error; nothing is written. A new path (no
    file in the way, a parent we may write in), an empty directory, or, with `resume`, a run directory: of `cfg`'s
    kind where `cfg` is given and, with `same_config`, one whose recorded config is `cfg` itself."""
    out = Path(out)
    if out.is_symlink() and not out.exists() or out.exists() and not out.is_dir():
        raise MergeabilityError(f"--out {out} is a file: a run needs a directory; choose another --out")
    if not out.exists():
        check_creatable(out)
        return out
    if not any(out.iterdir()):
        if not os.access(out, os.W_OK | os.X_OK):
            raise MergeabilityError(f"--out {out}: cannot write in it (permission denied): choose another --out")
        return out
    if not is_run(out):
        raise MergeabilityError(f"{out} is not empty and holds no run (no {CONFIG} or {STORE}): choose a new or "
                                "empty --out (--resume continues only a run)")
    if not resume:
        raise MergeabilityError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if (out / STORE).exists() and (out / STORE).stat().st_size:  # 0 bytes: created, killed before its first table
        _probe(out)
    if cfg is not None and (out / CONFIG).exists():  # no config yet: killed before writing it, so no rows either
        _check_same(out, cfg, same_config)
    return out


def check_writable(run_dir: Path, what: str) -> None:
    """Refuse, before anything is written, a run whose directory, store or figures cannot be written: `what`
    (an experiment, the report) would fail half-way with a permission error."""
    paths = (run_dir, run_dir / STORE, run_dir / "figures")
    unwritable = [p for p in paths if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0))]
    if unwritable:
        raise MergeabilityError(f"cannot write {what} into {unwritable[0]} (permission denied): copy the run to a "
                                "directory you may write in, and use the copy")


def is_run(path: Path) -> bool:
    """Whether `path` is (or was begun as) a run directory: `create` writes the store and the config first."""
    return (path / CONFIG).exists() or (path / STORE).exists()


def _probe(run_dir: Path) -> None:
    """A one-line error unless the run's store is a results store; opened read-only, so nothing changes."""
    try:
        Store(run_dir / STORE, lock=False, read_only=True).close()
    except MergeabilityError as e:
        raise MergeabilityError(f"{run_dir} is not a run directory: {e}") from None


def _check_same(out: Path, cfg, same_config: bool) -> None:
    recorded = load_config(out / CONFIG, kind=None)
    if recorded.kind != cfg.kind:
        raise MergeabilityError(f"{out} holds a {recorded.kind} run, and this is a {cfg.kind} run: choose another "
                                "--out")
    if same_config and recorded.to_dict() != cfg.to_dict():
        raise MergeabilityError(f"{out} holds another run (its {CONFIG} differs from this one's): choose another "
                                "--out")


def create(out: Path, cfg) -> Store:
    """Create (or reopen) a run directory once its input is checked: lock it, clear what a killed run left
    half-written, write the resolved config. Returns the (locked) store. A directory that holds something else,
    or a run of another kind, is refused before anything is written."""
    out = check_new(out, True, cfg)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / STORE)  # takes the run's lock before anything is written
    (out / UPDATES).mkdir(exist_ok=True)
    clear_stale(out / UPDATES)
    save_config(cfg, out / CONFIG)
    return store


def run_config(run_dir: Path, kind: str | None = None):
    """The config of the run in `run_dir` (of `kind`), or a one-line error if it is not one; reads only."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MergeabilityError(f"{run_dir} is not a run directory: it is a file")
    if not (run_dir / STORE).exists() or not (run_dir / CONFIG).exists():
        raise MergeabilityError(f"{run_dir} is not a run directory: it has no {STORE} and {CONFIG}")
    _probe(run_dir)
    cfg = load_config(run_dir / CONFIG, kind=None)
    if kind is not None and cfg.kind != kind:
        raise MergeabilityError(f"{run_dir} is a {cfg.kind} run: this needs a {kind} run")
    return cfg


def open_run(run_dir: Path, *, lock: bool = True, kind: str | None = None):
    """(config, store) of an existing run directory, or a one-line error if it is not one (of `kind`). Without
    `lock` (readers: reports, comparisons) the store is opened read-only; with it, only once the directory is
    known to be a run, so no lock file is left where there is none."""
    cfg = run_config(run_dir, kind)
    return cfg, Store(Path(run_dir) / STORE, lock=lock, read_only=not lock)


def provenance(cfg, **extra) -> dict:
    """What produced a run's results: model, revision, dtype, seed, library versions, and `extra`."""
    m = cfg.model
    return {"model": m.name, "revision": m.revision, "dtype": m.dtype, **extra, "seed": cfg.seed,
            "version": __version__, "torch": torch.__version__}


class Timings(dict):
    """Seconds per stage, in stage order."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = time.perf_counter() - t


# ------------------------------------------------------------------------------------- trial keys, scores


def run_key(cfg, partners: int | None = None) -> str:
    """The trial key of an example-level run's own method and parameters (optionally with another N)."""
    m = cfg.merge
    return params_key(m.method, {**m.params, "partners": m.partners if partners is None else partners})


def pool_key(cfg, pool: Sequence[str]) -> str:
    """The trial key of a task-level pool: method, parameters, N, and the pool itself (partners come from it)."""
    m = cfg.merge
    digest = hashlib.sha256("\x1f".join(sorted(pool)).encode()).hexdigest()[:16]
    return params_key(m.method, {**m.params, "partners": m.partners, "pool": digest})


def load_kept(store: Store, run_dir: Path, ids: set[str]) -> dict[str, Update]:
    """The run's kept updates among `ids` (its own items: a store may hold more), loaded, by id."""
    return {i: load_update(run_dir / p) for i, p in store.kept_updates().items() if i in ids}


def scores(store: Store, key: str, pool, trials: int, first: int = 0, complete: bool = False) -> dict[str, float]:
    """Mergeability score per update: mean correctness over trials first … first + trials − 1 under `key`.

    Only those trials count: an experiment that adds trials to the same key never changes the run's score.
    With `complete`, updates missing any of those trials are left out.
    """
    keep = set(pool)
    return {t: mean for t, (mean, n) in store.trial_means(key, first, trials).items()
            if t in keep and (not complete or n == trials)}


def example_scores(cfg, store: Store) -> dict[str, float]:
    """The scores of an example-level run's kept updates under its own key."""
    return scores(store, run_key(cfg), list(store.kept_updates()), cfg.merge.trials)


def task_pools(store: Store) -> dict[float, list[str]]:
    """threshold -> the tasks scored together at it (recorded by the run)."""
    return {float(k): v for k, v in (store.get_meta("pools") or {}).items()}


def task_scores(cfg, store: Store, pool: Sequence[str]) -> dict[str, float]:
    """Mergeability score per task of `pool`: its mean exact-match accuracy over the M trials."""
    return scores(store, pool_key(cfg, pool), pool, cfg.merge.trials)
