"""Model updates: per-module low-rank (A, B, scale) or dense ΔW changes; PEFT LoRA directories in and out."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergeability.atomic import atomic_dir
from mergeability.errors import MergeabilityError
from mergeability.models import get_module

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "mergeability.json"  # our extra file beside PEFT's two; PEFT ignores it
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LowRank:
    """ΔW = scale · B @ A, with A: (r, in) and B: (out, r), as PEFT stores them."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def delta(self) -> Tensor:
        return self.scale * (self.B @ self.A)

    @functools.cached_property
    def qr_At(self) -> tuple[Tensor, Tensor]:
        """Thin QR of Aᵀ, computed once per factor: KnOTS needs it every time this update is merged."""
        return torch.linalg.qr(self.A.T)

    def singular_values(self) -> Tensor:
        """Singular values of ΔW from two thin QRs and an r×r SVD, never forming the out×in matrix."""
        _, rb = torch.linalg.qr(self.B)
        _, ra = torch.linalg.qr(self.A.T)
        return abs(self.scale) * torch.linalg.svdvals(rb @ ra.T)

    def fro_norm(self) -> float:
        # ||BA||_F² = tr((BᵀB)(AAᵀ)): two r×r Gram matrices.
        g = (self.B.T @ self.B) * (self.A @ self.A.T)
        return abs(self.scale) * math.sqrt(max(g.sum().item(), 0.0))

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.A.to(dtype), self.B.to(dtype), self.scale)


@dataclass(frozen=True)
class Dense:
    """A full ΔW of shape (out, in): what TIES produces, and what full fine-tuning gives."""

    weight: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def delta(self) -> Tensor:
        return self.weight

    def singular_values(self) -> Tensor:
        return torch.linalg.svdvals(self.weight)

    def fro_norm(self) -> float:
        return torch.linalg.norm(self.weight).item()

    def to(self, dtype: torch.dtype) -> Dense:
        return Dense(self.weight.to(dtype))


ModuleDelta = LowRank | Dense


@dataclass(frozen=True)
class Update:
    """A set of per-module changes to one base model, keyed by full module name ('model.layers.15.mlp.up_proj')."""

    modules: Mapping[str, ModuleDelta]
    base_model: str | None = None
    meta: Mapping = field(default_factory=dict)  # provenance: how it was made

    def delta(self, name: str) -> Tensor:
        return self.modules[name].delta()

    def fro_norm(self) -> float:
        """Frobenius norm of the whole update (all modules)."""
        return math.sqrt(sum(m.fro_norm() ** 2 for m in self.modules.values()))

    def top_singular_value(self) -> float:
        """Largest singular value over the update's modules."""
        return max(m.singular_values()[0].item() for m in self.modules.values())

    def to(self, dtype: torch.dtype) -> Update:
        return Update({k: m.to(dtype) for k, m in self.modules.items()}, self.base_model, self.meta)


# ---------------------------------------------------------------- loading


def _pattern_value(patterns: Mapping[str, float], name: str, default):
    # PEFT's own rule (peft.utils.other.get_pattern_key): the first key that matches the end of the name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_update(path: str | Path) -> Update:
    """Read a PEFT LoRA adapter directory into an Update, checking everything that could make it wrong."""
    path = Path(path)
    if not path.is_dir():
        raise MergeabilityError(f"{path}: no such adapter directory")
    cfg_path = path / CONFIG
    if not cfg_path.exists():
        raise MergeabilityError(f"{path} is not a PEFT adapter directory: it has no {CONFIG}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeabilityError(f"{cfg_path}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeabilityError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    if cfg.get("use_dora"):
        raise MergeabilityError(f"{path}: DoRA adapters are not supported (use_dora is true)")
    state = _read_weights(path)

    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            raise MergeabilityError(f"{path}: unsupported tensor {key!r} (only lora_A/lora_B weights are read)")
        factors.setdefault(m["module"], {})[m["ab"]] = t
    if not factors:
        raise MergeabilityError(f"{path}: the adapter holds no LoRA weights")

    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[str, ModuleDelta] = {}
    for name in sorted(factors):
        ab = factors[name]
        if set(ab) != {"A", "B"}:
            raise MergeabilityError(f"{path}: module {name} has lora_{''.join(ab)} but not both factors")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeabilityError(
                f"{path}: module {name} has inconsistent factor shapes A{tuple(A.shape)} B{tuple(B.shape)}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise MergeabilityError(f"{path}: module {name} has NaN or infinite weights")
        r = _pattern_value(rank_pattern, name, r0)
        if r != A.shape[0]:
            raise MergeabilityError(f"{path}: module {name} has rank {A.shape[0]} but the config says r={r}")
        alpha = _pattern_value(alpha_pattern, name, alpha0)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[name] = LowRank(A, B, float(scale))
    meta = {}
    if (path / PROVENANCE).exists():
        try:
            meta = json.loads((path / PROVENANCE).read_text())
        except json.JSONDecodeError:
            meta = {}
    for name in meta.pop("dense_modules", None) or []:  # saved by us as identity-factor LoRA: dense again
        if name in modules:
            modules[name] = Dense(modules[name].delta())
    return Update(modules, cfg.get("base_model_name_or_path"), meta)


def _read_weights(path: Path) -> dict[str, Tensor]:
    st, binf = path / WEIGHTS, path / "adapter_model.bin"
    if st.exists():
        try:
            return load_file(st)
        except Exception as e:  # safetensors raises several types for truncated/corrupt headers
            raise MergeabilityError(f"{st}: unreadable or truncated safetensors file ({e})") from None
    if binf.exists():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MergeabilityError(f"{binf}: unreadable weights file ({e})") from None
    raise MergeabilityError(f"{path}: no {WEIGHTS} (or adapter_model.bin) beside {CONFIG}")


# ---------------------------------------------------------------- saving


def _as_factors(m: ModuleDelta) -> tuple[Tensor, Tensor, float]:
    if isinstance(m, LowRank):
        return m.A, m.B, m.scale
    # Dense ΔW as an exact LoRA of rank min(out, in): one factor is the identity, the other ΔW itself.
    out_f, in_f = m.shape
    eye = torch.eye(min(out_f, in_f), dtype=m.dtype)
    return (eye, m.weight, 1.0) if in_f <= out_f else (m.weight, eye, 1.0)


def save_update(update: Update, path: str | Path, *, base_model: str | None = None, force: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (atomically) that `PeftModel.from_pretrained` loads."""
    if not update.modules:
        raise MergeabilityError("cannot save an update with no modules")
    names = sorted(update.modules)
    factors = {n: _as_factors(update.modules[n]) for n in names}
    r0 = factors[names[0]][0].shape[0]
    alpha0 = factors[names[0]][2] * r0
    ranks = {n: f[0].shape[0] for n, f in factors.items()}
    alphas = {n: f[2] * f[0].shape[0] for n, f in factors.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or update.base_model,
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": names,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha0},
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tensors = {}
    for n, (A, B, _) in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.detach().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.detach().contiguous()
    if Path(path).exists() and not force:
        raise MergeabilityError(f"{path} already exists: choose another path or pass --force")
    with atomic_dir(path, replace=force) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        dense = [n for n in names if isinstance(update.modules[n], Dense)]
        meta = {**update.meta, "dense_modules": dense} if dense else update.meta
        if meta:
            (tmp / PROVENANCE).write_text(json.dumps(meta, indent=2, default=str))
    return Path(path)


# ---------------------------------------------------------------- applying


@contextlib.contextmanager
def applied(model: nn.Module, update: Update) -> Iterator[nn.Module]:
    """Add the update's ΔW into the model's weights for the block, then restore them bit for bit."""
    saved = {}
    try:
        with torch.no_grad():
            for name, m in update.modules.items():
                lin = get_module(model, name)
                if tuple(lin.weight.shape) != m.shape:
                    raise MergeabilityError(
                        f"update module {name} has shape {m.shape}, the model's is {tuple(lin.weight.shape)}"
                    )
                saved[name] = lin.weight.detach().clone()
                lin.weight += m.delta().to(lin.weight.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)
