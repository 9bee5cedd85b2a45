"""Files of BIG-bench (Srivastava et al., 2022; Apache-2.0), fetched at run time from the `bigbench` 1.0.0 source
distribution on PyPI.

The source distribution (358 MB) is downloaded once into `cache_dir()/downloads` and kept there: several data
sets live in it and later features read other members from it. A member a run needs is streamed out of it alone
(no full extraction) into `cache_dir()/bigbench-1.0.0/`, written atomically, and checked against a pinned SHA-256;
a cached member that fails the check (corrupt, truncated, edited) is extracted again. A folder of members (a task
with subtasks) is extracted the same way in one pass, appears whole or not at all, and is checked against a
pinned `tree_sha256` (one digest over its files' paths and SHA-256s).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console

from mergeability.atomic import atomic_dir, atomic_file
from mergeability.errors import MergeabilityError
from mergeability.fetch import CHUNK, cache_dir, download, registry_file, sha256_of

QA_WIKIDATA = "bigbench/benchmark_tasks/qa_wikidata/task.json"
NATURAL_INSTRUCTIONS = "bigbench/benchmark_tasks/natural_instructions"  # a folder: 61 subtasks' task.json


@dataclass(frozen=True)
class Archive:
    """A source distribution on the registry and the pinned checksums of the members read from it."""

    package: str
    filename: str
    root: str  # the folder every member sits under inside the archive
    # path inside `root` -> SHA-256 of that file (of a folder: its `tree_sha256`); unpinned ones are trusted as cached
    members: Mapping[str, str]


BIGBENCH = Archive("bigbench", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", {
    QA_WIKIDATA: "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802",
    NATURAL_INSTRUCTIONS: "669e5ebb5cb7e3302fb5ac89d9bd663f28b1f9c72c550159c98c50d0604bdeae",
})


def bigbench_member(path_inside: str, console: Console | None = None) -> Path:
    """The local copy of one file of the bigbench 1.0.0 sdist, e.g. `QA_WIKIDATA`, fetched and extracted on
    first use."""
    return member(BIGBENCH, path_inside, console)


def bigbench_folder(path_inside: str, console: Console | None = None) -> Path:
    """The local copy of one folder of the bigbench 1.0.0 sdist, e.g. `NATURAL_INSTRUCTIONS`, fetched and
    extracted on first use."""
    return folder(BIGBENCH, path_inside, console)


def _inside(archive: Archive, path_inside: str) -> PurePosixPath:
    inside = PurePosixPath(path_inside)
    if inside.is_absolute() or ".." in inside.parts or not inside.parts:
        raise MergeabilityError(f"{path_inside!r} is not a path inside {archive.filename}: give a relative path "
                                f"such as {QA_WIKIDATA}")
    return inside


def _sdist(archive: Archive, console: Console | None) -> Path:
    """The archive itself, downloaded once and checked against the registry's SHA-256."""
    remote = registry_file(archive.package, archive.filename)
    return download(remote, cache_dir() / "downloads" / archive.filename, console)


def member(archive: Archive, path_inside: str, console: Console | None = None) -> Path:
    """`path_inside` of `archive` under `cache_dir()/archive.root`: the cached copy if it passes its checksum,
    else extracted anew from the (downloaded, verified) archive."""
    inside = _inside(archive, path_inside)
    pinned = archive.members.get(path_inside)
    dest = cache_dir() / archive.root / inside
    if dest.exists() and (pinned is None or sha256_of(dest) == pinned):
        return dest
    extract(_sdist(archive, console), f"{archive.root}/{inside}", dest, pinned, console)
    return dest


def folder(archive: Archive, path_inside: str, console: Console | None = None) -> Path:
    """Every file under the folder `path_inside` of `archive`, as the directory `cache_dir()/archive.root/…`:
    the cached copy if it passes its pinned `tree_sha256`, else extracted anew from the archive."""
    inside = _inside(archive, path_inside)
    pinned = archive.members.get(path_inside)
    dest = cache_dir() / archive.root / inside
    if dest.is_dir() and (pinned is None or tree_sha256(dest) == pinned):
        return dest
    extract_folder(_sdist(archive, console), f"{archive.root}/{inside}", dest, pinned, console)
    return dest


def tree_sha256(root: Path) -> str:
    """One SHA-256 for a directory's content: over each file's path (relative, '/'-separated) and SHA-256, in
    path order. A missing, extra, renamed or changed file changes it."""
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel, p in files:
        h.update(f"{rel}\0{sha256_of(p)}\n".encode())
    return h.hexdigest()


def extract(archive: Path, name: str, dest: Path, sha256: str | None = None, console: Console | None = None) -> Path:
    """Stream the tar.gz `archive` to its member `name` and write that member alone to `dest`, atomically;
    with `sha256`, the extracted bytes must match it."""
    (console or Console(stderr=True)).print(f"extracting {name} from {archive.name}", highlight=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r|gz") as tar, atomic_file(dest) as tmp:
            if not _copy_member(tar, name, tmp):
                raise MergeabilityError(f"{archive.name} has no file {name}: check the path inside the archive")
            got = sha256_of(tmp) if sha256 else None
            if got != sha256:
                raise MergeabilityError(f"{name} in {archive.name} has SHA-256 {got[:12]}…, not the pinned "
                                        f"{sha256[:12]}…: delete {archive} to fetch the archive again")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise MergeabilityError(f"cannot read {archive} ({e}): delete it to fetch it again") from None
    return dest


def extract_folder(archive: Path, name: str, dest: Path, sha256: str | None = None,
                   console: Console | None = None) -> Path:
    """Stream the tar.gz `archive` once and write every file under its folder `name` to the directory `dest`,
    which appears whole (atomically, replacing a damaged copy); with `sha256`, its `tree_sha256` must match."""
    (console or Console(stderr=True)).print(f"extracting {name}/ from {archive.name}", highlight=False,
                                            soft_wrap=True)
    try:
        with tarfile.open(archive, "r|gz") as tar, atomic_dir(dest, replace=True) as tmp:
            if not _copy_folder(tar, name, tmp):
                raise MergeabilityError(f"{archive.name} has no folder {name}: check the path inside the archive")
            got = tree_sha256(tmp) if sha256 else None
            if got != sha256:
                raise MergeabilityError(f"{name}/ in {archive.name} has digest {got[:12]}…, not the pinned "
                                        f"{sha256[:12]}…: delete {archive} to fetch the archive again")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise MergeabilityError(f"cannot read {archive} ({e}): delete it to fetch it again") from None
    return dest


def _copy_folder(tar: tarfile.TarFile, name: str, out: Path) -> int:
    """Copy the regular files under folder `name` (as streamed) into `out`, keeping their relative paths; the
    number copied. A name that would leave `out` ('..', absolute) is skipped."""
    prefix, n = name.rstrip("/") + "/", 0
    for info in tar:
        path = info.name.removeprefix("./")
        rel = PurePosixPath(path[len(prefix):])
        if not (info.isfile() and path.startswith(prefix)) or rel.is_absolute() or ".." in rel.parts:
            continue
        target = out.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(info) as src, target.open("wb") as f:
            shutil.copyfileobj(src, f, CHUNK)
        n += 1
    return n


def _copy_member(tar: tarfile.TarFile, name: str, out: Path) -> bool:
    """Copy member `name` (as streamed: no seeking back) into `out`; False if the archive has none."""
    for info in tar:
        if info.name.removeprefix("./") == name and info.isfile():
            src = tar.extractfile(info)
            with src, out.open("wb") as f:
                shutil.copyfileobj(src, f, CHUNK)
            return True
    return False
