"""Per-item LoRA training: one low-rank update of the target modules, trained on the item's passage.

LoRA is attached with forward hooks (out += scale · x Aᵀ Bᵀ), initialised as PEFT does (A Kaiming-uniform,
B zero), and optimised with AdamW; the result is an `Update` that saves as a PEFT adapter directory.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mergeability.models import get_module
from mergeability.updates import LowRank, Update


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 64  # LoRA r (paper Table A.3)
    alpha: float = 128.0  # LoRA alpha: scale = alpha / r
    lr: float = 4e-3  # AdamW learning rate, no weight decay
    epochs: int = 10  # passes over the passage (one step each: a passage is one sequence)
    max_tokens: int = 256  # passages are truncated to this many tokens


@dataclass(frozen=True)
class TrainStats:
    loss: float  # training loss after the last step (mean token cross-entropy)
    passage_ppl: float  # perplexity of the passage under the base model (step 0, B = 0)
    passage_tokens: int


def init_factors(shape: tuple[int, int], rank: int, seed: int, key: str) -> tuple[Tensor, Tensor]:
    out_f, in_f = shape
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=√5) on an (r, in) matrix, as PEFT initialises lora_A
    A = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
    return A, torch.zeros(out_f, rank)


@contextlib.contextmanager
def lora_hooks(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]], scale: float) -> Iterator[None]:
    handles = []

    def hook(A, B):
        return lambda mod, inp, out: out + scale * ((inp[0] @ A.T) @ B.T)

    for name, (A, B) in factors.items():
        handles.append(get_module(model, name).register_forward_hook(hook(A, B)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def train_lora(
    model: nn.Module,
    input_ids: Tensor,
    modules: Sequence[str],
    cfg: TrainConfig,
    *,
    seed: int,
    key: str,
    base_model: str | None = None,
) -> tuple[Update, TrainStats]:
    """Train one LoRA update on one token sequence (1 × T)."""
    device = input_ids.device
    factors = {}
    for name in modules:
        lin = get_module(model, name)
        A, B = init_factors(tuple(lin.weight.shape), cfg.rank, seed, f"{key}/{name}")
        factors[name] = (A.to(device).requires_grad_(), B.to(device).requires_grad_())
    params = [p for ab in factors.values() for p in ab]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scale = cfg.alpha / cfg.rank
    ids = input_ids[:, : cfg.max_tokens]
    first = last = float("nan")
    with lora_hooks(model, factors, scale), torch.enable_grad():
        for step in range(cfg.epochs):
            loss = model(ids, labels=ids).loss
            if step == 0:
                first = loss.item()  # B = 0 at step 0: this is the base model's loss on the passage
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
    update = Update(
        {n: LowRank(A.detach().cpu(), B.detach().cpu(), scale) for n, (A, B) in factors.items()},
        base_model,
        {"training": {"rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "epochs": cfg.epochs, "seed": seed}},
    )
    return update, TrainStats(loss=last, passage_ppl=math.exp(first), passage_tokens=ids.shape[1])
