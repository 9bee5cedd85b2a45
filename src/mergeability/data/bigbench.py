"""Files of BIG-bench (Srivastava et al., 2022; Apache-2.0), fetched at run time from the `bigbench` 1.0.0 source
distribution on PyPI.

The source distribution (358 MB) is downloaded once into `cache_dir()/downloads` and kept there: several data
sets live in it and later features read other members from it. A member a run needs is streamed out of it alone
(no full extraction) into `cache_dir()/bigbench-1.0.0/`, written atomically, and checked against a pinned SHA-256;
a cached member that fails the check (corrupt, truncated, edited) is extracted again.
"""

from __future__ import annotations

import shutil
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.console import Console

from mergeability.atomic import atomic_file
from mergeability.errors import MergeabilityError
from mergeability.fetch import CHUNK, cache_dir, download, registry_file, sha256_of

QA_WIKIDATA = "bigbench/benchmark_tasks/qa_wikidata/task.json"


@dataclass(frozen=True)
class Archive:
    """A source distribution on the registry and the pinned checksums of the members read from it."""

    package: str
    filename: str
    root: str  # the folder every member sits under inside the archive
    members: Mapping[str, str]  # path inside `root` -> SHA-256 of that file; unpinned members are trusted as cached


BIGBENCH = Archive("bigbench", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", {
    QA_WIKIDATA: "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802",
})


def bigbench_member(path_inside: str, console: Console | None = None) -> Path:
    """The local copy of one file of the bigbench 1.0.0 sdist, e.g. `QA_WIKIDATA`, fetched and extracted on
    first use."""
    return member(BIGBENCH, path_inside, console)


def member(archive: Archive, path_inside: str, console: Console | None = None) -> Path:
    """`path_inside` of `archive` under `cache_dir()/archive.root`: the cached copy if it passes its checksum,
    else extracted anew from the (downloaded, verified) archive."""
    inside = PurePosixPath(path_inside)
    if inside.is_absolute() or ".." in inside.parts or not inside.parts:
        raise MergeabilityError(f"{path_inside!r} is not a path inside {archive.filename}: give a relative path "
                                f"such as {QA_WIKIDATA}")
    pinned = archive.members.get(path_inside)
    dest = cache_dir() / archive.root / inside
    if dest.exists() and (pinned is None or sha256_of(dest) == pinned):
        return dest
    remote = registry_file(archive.package, archive.filename)
    sdist = download(remote, cache_dir() / "downloads" / archive.filename, console)
    extract(sdist, f"{archive.root}/{inside}", dest, pinned, console)
    return dest


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


def _copy_member(tar: tarfile.TarFile, name: str, out: Path) -> bool:
    """Copy member `name` (as streamed: no seeking back) into `out`; False if the archive has none."""
    for info in tar:
        if info.name.removeprefix("./") == name and info.isfile():
            src = tar.extractfile(info)
            with src, out.open("wb") as f:
                shutil.copyfileobj(src, f, CHUNK)
            return True
    return False
