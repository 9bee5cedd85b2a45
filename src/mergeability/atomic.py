"""Atomic writes: a file or directory appears whole under its name, or not at all.

Everything is written beside its target (same filesystem, so the final rename is atomic) under a dot-name
that `stale` recognises, so a run resumed after a kill can clear what the kill left half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"  # part of every temporary name written here


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes. `suffix` keeps
    an extension that a writer looks at (matplotlib picks the format from it)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block completes; an existing `target` is
    swapped out (and removed) only with `replace`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    try:
        yield tmp
        if target.exists() and replace:
            old = target.with_name(f".{target.name}.old{TMP_MARK}{tmp.name[-8:]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear_stale(directory: Path) -> None:
    """Remove what a killed process left half-written in `directory` (temporary files and directories)."""
    for stale in directory.glob(f".*{TMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
