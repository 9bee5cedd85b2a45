"""Batched-forward plumbing shared by the engine, generation and training.

- `pad_rows`, `padding_mask`: rows of different lengths as one tensor, and which positions hold tokens.
- `attention_bias`: the engine's 4-D additive mask (causal, prompt shared, options blind to each other).
- `common_prefix`, `prefix_cache`: the tokens every row of a batch starts with, run once and its keys/values
  broadcast to every row (a task's definition and examples are most of each prompt); `cache_kwarg`, the name a
  model takes that cache by.
- `add_to_outputs`: forward hooks that add a term computed from a module's input to its output: how weight
  updates (one per batch row, or one for all) ride along a forward pass without the weights being touched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from mergeability.models import get_module


def pad_rows(rows: Sequence[Sequence[int] | Tensor], fill: int | float, width: int | None = None, *,
             left: bool = False) -> Tensor:
    """(B, width, …): row b's entries first (or last, `left`), `fill` elsewhere. A row is a list of token ids or
    a tensor whose first dimension is its length (its dtype and device are kept); width defaults to the longest."""
    rows = [r if isinstance(r, Tensor) else torch.tensor(r, dtype=torch.long) for r in rows]
    width = max(len(r) for r in rows) if width is None else width
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype, device=rows[0].device)
    for b, r in enumerate(rows):
        if left:
            out[b, width - len(r) :] = r
        else:
            out[b, : len(r)] = r
    return out


def padding_mask(lengths: Sequence[int], width: int, *, left: bool = False) -> Tensor:
    """(B, width) HF attention mask of `pad_rows`' layout: 1 where a row has a token, 0 on its padding."""
    return pad_rows([[1] * n for n in lengths], 0, width, left=left)


def attention_bias(segs: Sequence[Tensor], T: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, T, T) additive mask: causal, prompt visible to all, options blind to each other, padding inert.
    segs[b] labels row b's positions: -1 for the prompt (seen by every later position), j for option j."""
    B = len(segs)
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b, seg in enumerate(segs):
        n = len(seg)
        same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
        allowed[b, :n, :n] = same & causal[:n, :n]
        allowed[b, n:, n:] = torch.eye(T - n, dtype=torch.bool)  # padding attends to itself: no NaN rows
    bias = torch.zeros(B, 1, T, T, dtype=dtype)
    return bias.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return max(n, 0)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward (and generate) takes a KV cache by: `cache` from transformers 5.24 on, where
    the old `past_key_values` is deprecated (removed in 5.40), `past_key_values` before."""
    return _cache_kwarg(type(model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    # read from the class, once: reading a signature costs ~80 µs a call (every task-training step asks), and an
    # instance's forward may be a hook's (*args, **kwargs) wrapper that hides the name
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def prefix_cache(model: nn.Module, prefix: Tensor, rows: int) -> DynamicCache:
    """Keys and values of `prefix` (1 × P) computed once and repeated for `rows` batch rows, to pass (by
    `cache_kwarg`) with the rows' own tokens. Gradients flow through it when enabled (task training)."""
    cache = DynamicCache()
    model(input_ids=prefix, use_cache=True, **{cache_kwarg(model): cache})
    cache.batch_repeat_interleave(rows)
    return cache


@contextlib.contextmanager
def add_to_outputs(model: nn.Module, deltas: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Within the block, module `name`'s output is output + deltas[name](its input). Each caller's delta does
    its own arithmetic (how it scales, batched or not): only the hooking is shared."""
    handles = []
    try:
        for name, fn in deltas.items():
            hook = lambda mod, inp, out, fn=fn: out + fn(inp[0])  # noqa: E731
            handles.append(get_module(model, name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
