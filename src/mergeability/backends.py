"""Where independent jobs (trial chunks, experiment merges, training batches) run: in this process, in worker
processes forked from it, or on Ray actors that each hold the base model. Either way the driver alone writes the
store, as results stream back.

A pool runs `job(context, shared, payload)` for each payload: `context` is what a worker builds once (the model
and its scorer), `shared` what every job reads (the updates), `payload` one job's input. Jobs are plain
module-level functions, so they pickle.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mergeability.errors import MergeabilityError, one_line

BACKENDS = ("local", "processes", "ray")
# Seconds RayPool.map waits with no job finishing before it gives up with a one-line error (a worker that cannot
# start or be scheduled, or that hangs). MERGEABILITY_RAY_TIMEOUT changes it; it covers the workers' setup too.
RAY_TIMEOUT_S = 1800.0


class LocalPool:
    """Runs jobs one after another in this process, on a context that is already built."""

    def __init__(self, context: Any, shared: Any):
        self.context, self.shared = context, shared

    def map(self, job: Callable, payloads: Sequence) -> Iterator[tuple[int, Any]]:
        for i, p in enumerate(payloads):
            yield i, job(self.context, self.shared, p)

    def close(self) -> None:
        pass


class ForkPool:
    """Jobs on `workers` processes forked from this one, each running torch on `threads` threads. A fork starts
    with the model, its caches and the shared data this process holds (pages shared until written), so a stage
    pays no set-up. Why: on a small CPU, two one-thread processes get more done than one two-thread process,
    because the small matrices of a LoRA step, an SVD or a TIES merge do not keep two threads busy (measured in
    docs/scaling.md). Results come back as jobs finish; a worker that fails or dies is a one-line error."""

    def __init__(self, context: Any, shared: Any, *, workers: int, threads: int = 1):
        global _FORKED
        _FORKED = (context, shared)  # what the forks inherit: read by _fork_run, never pickled
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_fork_init, initargs=(threads, os.getpid()))

    def map(self, job: Callable, payloads: Sequence) -> Iterator[tuple[int, Any]]:
        futures = {self.executor.submit(_fork_run, job, p): i for i, p in enumerate(payloads)}
        try:
            for f in as_completed(futures):
                yield futures[f], _result(f, futures[f])
        except BaseException:  # a failed job, Ctrl-C, a closed generator: stop the workers now, not after their jobs
            self._kill()
            raise

    def close(self) -> None:
        global _FORKED
        self.executor.shutdown(wait=True, cancel_futures=True)  # after map's end or _kill: nothing left to wait for
        _FORKED = None

    def _kill(self) -> None:
        for p in list(getattr(self.executor, "_processes", {}).values()):  # the executor offers no public handle
            p.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _result(future, i: int) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise MergeabilityError("a worker process died (out of memory?): run again with --backend local, or "
                                "fewer --workers") from None
    except MergeabilityError as e:
        raise MergeabilityError(one_line(e)) from None
    except Exception as e:  # a bug in a job: its type and message, in one line
        raise MergeabilityError(f"job {i} failed in a worker process: {type(e).__name__}: {one_line(e)}") from None


_FORKED: tuple[Any, Any] | None = None  # (context, shared) of the open ForkPool, inherited by its workers


def _fork_init(threads: int, parent: int) -> None:
    import torch

    # A worker dies with the run: killed (kill -9, out of memory), the run cannot stop its workers, and they
    # would wait for jobs for ever. Linux's parent-death signal does it for them (prctl PR_SET_PDEATHSIG = 1);
    # a run that died before the signal was set is seen by the parent's pid changing.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the pool, not each worker


def _fork_run(job: Callable, payload: Any) -> Any:
    context, shared = _FORKED
    return job(context, shared, payload)


def forks_safely(device: str) -> bool:
    """Whether worker processes may be forked: on Linux (fork is unsafe on macOS) and before CUDA starts."""
    return sys.platform.startswith("linux") and not device.startswith("cuda")


class RayPool:
    """One actor per worker, each building the context once (`setup()`); results come back as they finish.

    `address` None starts (or joins) a local Ray; workers default to one per GPU when `gpus_per_worker` > 0,
    else one per `cpus_per_worker` CPUs of the cluster."""

    def __init__(self, setup: Callable[[], Any], shared: Any, *, address: str | None = None,
                 workers: int | None = None, cpus_per_worker: int = 1, gpus_per_worker: float = 0):
        self.ray = ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         num_cpus=None if address else os.cpu_count(), configure_logging=False)
            except Exception as e:  # no cluster at the address, …: one line is what the user needs
                raise MergeabilityError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                                        f"{str(e).splitlines()[0]}") from None
        if _live_nodes(ray) == 0:  # this process's Ray is up but its cluster died (stopped, crashed, OOM-killed)
            raise MergeabilityError("the Ray cluster this process is connected to has no live node: "
                                    "restart it (or the process)")
        res = ray.cluster_resources()
        if workers is None:
            workers = (int(res.get("GPU", 0) // gpus_per_worker) if gpus_per_worker
                       else int(res.get("CPU", 1) // cpus_per_worker))
        if workers < 1:
            raise MergeabilityError(f"the Ray cluster has no room for a worker ({res}): lower --workers' needs")
        shared_ref = ray.put(shared)
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        self.actors = [actor.remote(setup, shared_ref, cpus_per_worker) for _ in range(workers)]

    def map(self, job: Callable, payloads: Sequence) -> Iterator[tuple[int, Any]]:
        """(index, result) of each payload as jobs finish. A job that raises, a worker that dies, or no job
        finishing for `timeout` seconds (MERGEABILITY_RAY_TIMEOUT, default RAY_TIMEOUT_S) is a one-line
        MergeabilityError: never a wait without end."""
        ray = self.ray
        timeout = float(os.environ.get("MERGEABILITY_RAY_TIMEOUT") or RAY_TIMEOUT_S)
        free, running, queue = list(self.actors), {}, list(enumerate(payloads))
        last = time.monotonic()
        while queue or running:
            while free and queue:
                i, p = queue.pop(0)
                a = free.pop()
                running[a.run.remote(job, p)] = (i, a)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=min(10.0, timeout))
            if not ready:
                if _live_nodes(ray) == 0:  # actors can never be placed again: say so now, not at the timeout
                    raise MergeabilityError(f"the Ray cluster lost its last node with {len(running)} jobs running")
                if time.monotonic() - last > timeout:
                    raise MergeabilityError(
                        f"no Ray job finished in {timeout:.0f} s ({len(running)} running, {len(queue)} queued; "
                        f"free in the cluster: {_resources(ray)}): a worker cannot start or is stuck")
                continue
            last = time.monotonic()
            i, a = running.pop(ready[0])
            try:
                result = ray.get(ready[0], timeout=timeout)
            except Exception as e:  # the job raised, or its worker died: one line, not a remote traceback
                raise MergeabilityError(f"Ray job {i} failed: {_one_line(e)}") from None
            free.append(a)
            yield i, result

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead, or Ray already shut down
                self.ray.kill(a)
        self.actors = []


class _Worker:
    def __init__(self, setup: Callable[[], Any], shared: Any, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.context, self.shared = setup(), shared

    def run(self, job: Callable, payload: Any) -> Any:
        return job(self.context, self.shared, payload)


def _live_nodes(ray) -> int | None:
    """Alive nodes of the cluster, or None when the cluster cannot be asked (then only the timeout decides)."""
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:
        return None


def _resources(ray) -> str:
    try:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(ray.available_resources().items())
                         if k in ("CPU", "GPU")) or "no CPU or GPU"
    except Exception:
        return "unknown"


def _one_line(e: BaseException) -> str:
    """A remote failure in one line: the job's own exception where Ray carries it; for a worker that died, why
    (the exception of its setup when that is what killed it)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, MergeabilityError):
        return lines[0] if lines else "MergeabilityError"
    if type(e).__name__ == "ActorDiedError":
        if getattr(e, "actor_init_failed", False) and lines:  # "… creation task, … Traceback … X: msg"
            return f"a Ray worker could not start: {lines[-1].split('MergeabilityError: ', 1)[-1]}"
        return f"a Ray worker died: {lines[0] if lines else 'no reason given'}"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MergeabilityError("--backend ray needs Ray: pip install 'mergeability[ray]'") from None
    return ray


def check_backend(cfg) -> None:
    """A run's backend settings, checked before any work: the name, and Ray's presence when it is asked for."""
    if cfg.backend.name not in BACKENDS:
        raise MergeabilityError(f"unknown backend {cfg.backend.name!r}: use local, processes or ray")
    if cfg.backend.name == "ray":
        _import_ray()


def local_pool(cfg, context: Any, shared: Any) -> LocalPool | ForkPool:
    """A pool on this machine for jobs that need the context this process built: forked workers for the
    processes backend where forking is safe, else this process (local, and ray for the stages Ray does not
    run: screening and training)."""
    threads = cfg.model.threads or 1
    if cfg.backend.name == "processes" and forks_safely(cfg.model.device):
        workers = cfg.backend.workers or max(1, len(os.sched_getaffinity(0)) // threads)
        return ForkPool(context, shared, workers=workers, threads=threads)
    return LocalPool(context, shared)


@contextlib.contextmanager
def pool_for(cfg, setup: Callable[[], Any], local_context: Any, shared: Any) -> Iterator:
    """The pool of a run's backend (`cfg.backend`, and the model's `threads` and `device`) for one stage;
    local and processes reuse the context this process already built (`local_pool`), ray builds one per actor
    with `setup`. Closed (workers or actors released) when the stage ends."""
    if cfg.backend.name != "ray":
        pool = local_pool(cfg, local_context, shared)
    else:
        check_backend(cfg)
        pool = RayPool(setup, shared, address=cfg.backend.address, workers=cfg.backend.workers,
                       cpus_per_worker=cfg.model.threads or 1,
                       gpus_per_worker=1 if cfg.model.device.startswith("cuda") else 0)
    try:
        yield pool
    finally:
        pool.close()
