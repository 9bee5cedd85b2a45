"""Atomic writes: a file or directory appears whole under its name, or not at all.

Everything is written beside its target (same filesystem, so the final rename is atomic) under a dot-name
that `stale` recognises, so a run resumed after a kill can clear what the kill left half-written. What is
written gets the modes `open` and `mkdir` would give (the umask decides), not the private 0600/0700 of
`tempfile`: an adapter or a report is meant to be shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from mergeability.errors import MergeabilityError

TMP_MARK = ".tmp-"  # part of every temporary name written here


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or directory) gets from `open` (`mkdir`): for writers that pick a private one."""
    return (0o777 if directory else 0o666) & ~umask()


def _fresh(parent: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """A new path `parent/prefix<random>suffix`, created by `make` (which fails if the name is taken)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {parent / prefix}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes. `suffix` keeps
    an extension that a writer looks at (matplotlib picks the format from it)."""
    path = Path(path)
    tmp = _fresh(path.parent, f".{path.name}{TMP_MARK}", suffix, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(x):
    """`x` as strict JSON takes it: NaN and infinities as null (JSON has no NaN: other readers reject it), tuples
    and arrays as lists, numpy scalars as Python numbers."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or hasattr(x, "tolist"):
        return [jsonable(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]
    return x


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """`obj` as strict JSON (see `jsonable`), written atomically."""
    write_text(path, json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n")


def make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing ancestors; return those created, outermost first, so that a failed
    write can take them away again (`remove_created`). A one-line error where a file stands in the way or the
    filesystem refuses."""
    directory = Path(os.path.abspath(directory))
    missing = [p for p in [directory, *directory.parents] if not p.exists()][::-1]
    created: list[Path] = []
    try:
        for p in missing:
            try:
                p.mkdir()
                created.append(p)
            except FileExistsError:  # made meanwhile by another process: fine if it is a directory
                if not p.is_dir():
                    raise
    except OSError as e:
        remove_created(created)
        raise MergeabilityError(f"cannot create {directory}: {e.strerror or e}: {e.filename or directory}") from None
    if not directory.is_dir():
        raise MergeabilityError(f"cannot create {directory}: a file is in the way")
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the directories `make_parents` created, innermost first, where they are still empty."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block completes. An existing `target`
    directory is swapped out (and removed) only with `replace`; a file or link under that name never is.
    Missing parent directories are created, and removed again if the block fails (an interrupt included)."""
    target = Path(os.path.abspath(target))
    created = make_parents(target.parent)
    try:
        tmp = _fresh(target.parent, f".{target.name}{TMP_MARK}", "", lambda p: p.mkdir())
    except BaseException:
        remove_created(created)
        raise
    try:
        yield tmp
        _swap_in(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise


def _swap_in(tmp: Path, target: Path, replace: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        tmp.rename(target)
        return
    if not replace:
        raise MergeabilityError(f"{target} already exists: choose another path")
    if target.is_symlink() or not target.is_dir():
        raise MergeabilityError(f"{target} is a file, not a directory: it is not replaced")
    old = target.with_name(f".{target.name}.old{TMP_MARK}{tmp.name[-8:]}")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def check_creatable(path: str | Path, what: str = "--out") -> None:
    """A one-line error unless a new `path` could be made: the nearest existing ancestor must be a directory this
    process may write into (a file in the way, or a read-only parent, is found before anything is written)."""
    path = Path(os.path.abspath(path))
    ancestor = next(p for p in path.parents if p.exists() or p.is_symlink())
    if not ancestor.is_dir():
        raise MergeabilityError(f"{what} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MergeabilityError(f"{what} {path}: cannot write in {ancestor} (permission denied): choose another path")


def clear_stale(directory: Path) -> None:
    """Remove what a killed process left half-written in `directory` (temporary files and directories)."""
    for stale in directory.glob(f".*{TMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
