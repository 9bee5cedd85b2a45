"""Model updates: per-module low-rank (A, B, scale) or dense ΔW changes; PEFT LoRA directories in and out."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergeability.atomic import atomic_dir, default_mode
from mergeability.errors import MergeabilityError, one_line
from mergeability.models import get_module

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "mergeability.json"  # our extra file beside PEFT's two; PEFT ignores it
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes some libraries put in messages
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
        what = "is a file, not an adapter directory" if path.exists() else "no such adapter directory"
        raise MergeabilityError(f"{path}: {what}")
    cfg_path = path / CONFIG
    if not (cfg_path.exists() or cfg_path.is_symlink()):
        raise MergeabilityError(f"{path} is not a PEFT adapter directory: it has no {CONFIG}")
    cfg = LoraSettings.parse(_read_json(cfg_path), cfg_path)
    meta = _read_provenance(path)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in _read_weights(path).items():
        m = _KEY.match(key)
        if m is None:
            raise MergeabilityError(f"{path}: unsupported tensor {key!r} (only lora_A/lora_B weights are read)")
        factors.setdefault(m["module"], {})[m["ab"]] = t
    if not factors:
        raise MergeabilityError(f"{path}: the adapter holds no LoRA weights")
    modules = {name: _module(path, name, factors[name], cfg) for name in sorted(factors)}
    for name in meta.pop("dense_modules", None) or []:  # saved by us as identity-factor LoRA: dense again
        if name in modules:
            modules[name] = Dense(modules[name].delta())
    return Update(modules, cfg.base_model, meta)


def _module(path: Path, name: str, ab: dict[str, Tensor], cfg: LoraSettings) -> LowRank:
    """One module's factors, checked against each other and against the config's rank."""
    if set(ab) != {"A", "B"}:
        raise MergeabilityError(f"{path}: module {name} has lora_{''.join(ab)} but not both factors")
    A, B = ab["A"], ab["B"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise MergeabilityError(
            f"{path}: module {name} has inconsistent factor shapes A{tuple(A.shape)} B{tuple(B.shape)}"
        )
    if not (A.is_floating_point() and B.is_floating_point()):
        raise MergeabilityError(f"{path}: module {name} has {A.dtype}/{B.dtype} weights: LoRA factors are floats")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise MergeabilityError(f"{path}: module {name} has NaN or infinite weights")
    r = _pattern_value(cfg.rank_pattern, name, cfg.r)
    if r != A.shape[0]:
        raise MergeabilityError(f"{path}: module {name} has rank {A.shape[0]} but the config says r={r}")
    alpha = _pattern_value(cfg.alpha_pattern, name, cfg.alpha)
    scale = float(alpha / math.sqrt(r) if cfg.rslora else alpha / r)
    if not representable(LowRank(A, B, scale)):  # an absurd alpha: every merge would compute infinities
        raise MergeabilityError(f"{path}: module {name}: scale {scale:.3g} (lora_alpha / r) makes ΔW overflow "
                                f"{str(A.dtype).removeprefix('torch.')}: check lora_alpha")
    return LowRank(A, B, scale)


def representable(m: ModuleDelta) -> bool:
    """Whether every entry of ΔW is finite in the update's dtype, without forming ΔW for a low-rank one:
    |ΔW_ij| ≤ |scale|·‖B_i‖·‖A_:j‖ (Cauchy–Schwarz), computed in float64."""
    if isinstance(m, Dense):
        return bool(torch.isfinite(m.weight).all())
    if not (m.A.numel() and m.B.numel()):
        return True
    bound = abs(m.scale) * m.B.double().norm(dim=1).max().item() * m.A.double().norm(dim=0).max().item()
    return bound <= torch.finfo(m.dtype).max  # False for NaN too


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeabilityError(f"{file}: invalid JSON ({one_line(e)})") from None
    except OSError as e:  # a directory under that name, no permission, a dangling link
        raise MergeabilityError(f"{file}: cannot read it ({e.strerror or one_line(e)})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each adapter_config.json field read here must hold: (check, words for the message).
_RANK = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_ALPHA = (_is_number, "a finite number")
_FLAG = (lambda v: v is None or isinstance(v, bool), "true, false or null")
_NAME = (lambda v: v is None or isinstance(v, str), "text or null")
_TARGETS = (lambda v: v is None or isinstance(v, str) or isinstance(v, list) and all(isinstance(n, str) for n in v),
            "a list of module names, a pattern, or null")  # not used here, but PEFT fails on anything else


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a PEFT adapter_config.json that decide ΔW, each checked for type (PEFT's defaults where one
    is absent): a string "16" or a null where a number belongs is a one-line error, never a wrong scale."""

    r: int
    alpha: float
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    rslora: bool
    base_model: str | None

    @classmethod
    def parse(cls, cfg, where: Path) -> LoraSettings:
        if not isinstance(cfg, dict):
            raise MergeabilityError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise MergeabilityError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
        if _field(cfg, "use_dora", False, _FLAG, where):
            raise MergeabilityError(f"{where}: DoRA adapters are not supported (use_dora is true)")
        _field(cfg, "target_modules", None, _TARGETS, where)
        return cls(_field(cfg, "r", 8, _RANK, where), _field(cfg, "lora_alpha", 8, _ALPHA, where),
                   _patterns(cfg, "rank_pattern", _RANK, where), _patterns(cfg, "alpha_pattern", _ALPHA, where),
                   bool(_field(cfg, "use_rslora", False, _FLAG, where)),
                   _field(cfg, "base_model_name_or_path", None, _NAME, where))


def _field(cfg: dict, key: str, default, rule, where: Path):
    value = cfg.get(key, default)
    if not rule[0](value):
        raise MergeabilityError(f"{where}: {key} must be {rule[1]}, got {value!r}")
    return value


def _patterns(cfg: dict, key: str, rule, where: Path) -> dict:
    """A per-module pattern map (PEFT: module-name regex -> value); null or absent = none."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise MergeabilityError(f"{where}: {key} must be an object mapping module patterns to values, "
                                f"got {type(patterns).__name__}")
    for k, v in patterns.items():
        try:
            re.compile(k)
        except re.error as e:
            raise MergeabilityError(f"{where}: {key} key {k!r} is not a valid pattern ({e})") from None
        if not rule[0](v):
            raise MergeabilityError(f"{where}: {key}[{k!r}] must be {rule[1]}, got {v!r}")
    return patterns


def _read_provenance(path: Path) -> dict:
    """Our provenance file beside the adapter ({} where there is none); a malformed one is an error, since it
    says which modules are dense."""
    file = path / PROVENANCE
    if not (file.exists() or file.is_symlink()):
        return {}
    meta = _read_json(file)
    if not isinstance(meta, dict):
        raise MergeabilityError(f"{file}: expected a JSON object, got {type(meta).__name__}: delete or fix the file")
    dense = meta.get("dense_modules")
    if dense is not None and not (isinstance(dense, list) and all(isinstance(n, str) for n in dense)):
        raise MergeabilityError(f"{file}: dense_modules must be a list of module names, got {dense!r}")
    return meta


def _read_weights(path: Path) -> dict[str, Tensor]:
    st, binf = path / WEIGHTS, path / "adapter_model.bin"
    if st.exists():
        try:
            return load_file(st)
        except Exception as e:  # safetensors raises several types for truncated/corrupt headers
            raise MergeabilityError(f"{st}: unreadable or truncated safetensors file ({_plain(e)})") from None
    if not binf.exists():
        raise MergeabilityError(f"{path}: no {WEIGHTS} (or adapter_model.bin) beside {CONFIG}")
    try:
        state = torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and str(e).startswith("Weights only load failed"):
            # torch's own message is many lines of advice, with terminal colours
            raise MergeabilityError(f"{binf}: refused: it holds pickled objects other than tensors, which a safe "
                                    f"load does not run; save the adapter as {WEIGHTS}") from None
        raise MergeabilityError(f"{binf}: unreadable weights file ({type(e).__name__}: {_plain(e)})") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise MergeabilityError(f"{binf}: expected a mapping of tensor names to tensors, got {type(state).__name__}")
    return state


def _plain(e: BaseException) -> str:
    """A library's message as one line without terminal colour codes."""
    return _ANSI.sub("", one_line(e))


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
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise MergeabilityError(f"{path} already exists: choose another path or pass --force")
        check_replaceable(path)
    with atomic_dir(path, replace=force) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / WEIGHTS).chmod(default_mode())  # safetensors writes 0600; an adapter is meant to be shared
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        dense = [n for n in names if isinstance(update.modules[n], Dense)]
        meta = {**update.meta, "dense_modules": dense} if dense else update.meta
        # Always written, even empty: it is how `check_replaceable` knows a directory as ours.
        (tmp / PROVENANCE).write_text(json.dumps(meta, indent=2, default=str))
    return path


OURS = frozenset({CONFIG, WEIGHTS, PROVENANCE})  # all an adapter directory this package writes holds


def check_replaceable(path: Path) -> None:
    """A one-line error unless `path` is an adapter directory this package wrote (`save_update`): a directory,
    not a link, holding our provenance file beside PEFT's two and nothing else. `--force` replaces only such a
    directory, so it can never delete a user's files, a file, or someone else's adapter."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise MergeabilityError(f"{path} is a file, not an adapter directory: --force replaces only an adapter "
                                "this tool wrote; remove it yourself or choose another path")
    names = {p.name for p in path.iterdir()}
    others = sorted(names - OURS)
    if others or PROVENANCE not in names:
        why = f"it holds {', '.join(others[:3])}{' …' if len(others) > 3 else ''}" if others else f"no {PROVENANCE}"
        raise MergeabilityError(f"{path} is not an adapter this tool wrote ({why}): --force replaces only such a "
                                "directory; remove it yourself or choose another path")
    try:
        ours = isinstance(json.loads((path / PROVENANCE).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise MergeabilityError(f"{path} is not an adapter this tool wrote (its {PROVENANCE} is not ours): "
                                "remove it yourself or choose another path")


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
