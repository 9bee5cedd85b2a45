"""Fast evaluation of many (item, update) pairs on one base model.

Three ideas, each checked against the plain path (full model, update merged into the weights) in the tests:

1. Activation cache. Updates touch modules of layers ≥ L only, so the hidden states entering layer L are the
   same for every update: computed once per item, then each evaluation runs layers L… only.
2. Packed options. An item's prompt and all its options form one sequence: option tokens attend to the prompt
   and to their own earlier tokens (a 4-D mask) and restart their positions after the prompt. Only positions
   that predict option tokens reach the output head, once per batch.
3. Per-row low-rank deltas. Each batch row carries its own update, applied as x·Aᵀ·Bᵀ (bmm) inside a hook,
   so many different merged updates share one forward pass and no base + ΔW is ever formed.

Works for Llama-style models (Llama, Qwen2, Mistral, Gemma 3: `model.model.{embed_tokens, layers, norm,
rotary_emb}`; `models.attention_inputs` gives each layer its mask and rotary embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergeability.batching import add_to_outputs, attention_bias, pad_rows
from mergeability.data.mc import MCItem
from mergeability.errors import MergeabilityError
from mergeability.models import attention_inputs, decoder_layers, get_module, layer_index
from mergeability.scoring import ItemScore, encode, normalise_scores
from mergeability.updates import Dense, LowRank, Update


@dataclass
class Packed:
    """One item as one sequence: prompt, then every option, with what to read off the output head."""

    ids: Tensor  # (T,)
    pos: Tensor  # (T,) position ids: options restart after the prompt
    seg: Tensor  # (T,) -1 for the prompt, j for option j
    predict_at: Tensor  # (K,) positions whose next-token logits score an option token
    targets: Tensor  # (K,) the option tokens they must predict
    option_of: Tensor  # (K,) which option each belongs to
    n_tokens: Tensor  # (n_options,)
    n_chars: Tensor  # (n_options,)
    gold: int


def pack(tokenizer, item: MCItem) -> Packed:
    enc = encode(tokenizer, item)
    P = len(enc.prompt)
    ids, pos, seg = list(enc.prompt), list(range(P)), [-1] * P
    predict_at, targets, option_of = [], [], []
    for j, opt in enumerate(enc.options):
        start = len(ids)
        for k, tok in enumerate(opt):
            predict_at.append(P - 1 if k == 0 else start + k - 1)  # the prompt's last position is shared
            targets.append(tok)
            option_of.append(j)
        ids += opt
        pos += range(P, P + len(opt))
        seg += [j] * len(opt)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Packed(t(ids), t(pos), t(seg), t(predict_at), t(targets), t(option_of),
                  torch.tensor([len(o) for o in enc.options], dtype=torch.float64),
                  torch.tensor(enc.option_chars, dtype=torch.float64), item.gold)


def _stack_rows(rows: list[LowRank | Dense | None], shape: tuple[int, int], dtype, device) -> tuple[str, tuple]:
    """Per-row deltas of one module as batched factors (ranks zero-padded) or, if any row is dense, dense."""
    out_f, in_f = shape
    if any(isinstance(r, Dense) for r in rows):
        W = torch.zeros(len(rows), out_f, in_f, dtype=dtype, device=device)
        for b, r in enumerate(rows):
            if r is not None:
                W[b] = r.delta().to(dtype)
        return "dense", (W.transpose(1, 2),)
    R = max([r.rank for r in rows if r is not None] or [1])
    At = torch.zeros(len(rows), in_f, R, dtype=dtype, device=device)
    Bt = torch.zeros(len(rows), R, out_f, dtype=dtype, device=device)
    for b, r in enumerate(rows):
        if r is not None:
            At[b, :, : r.rank] = r.A.T.to(dtype)
            Bt[b, : r.rank] = (r.scale * r.B.T).to(dtype)
    return "lowrank", (At, Bt)


def _row_delta(kind: str, f: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
    """x ↦ row b's x·ΔWᵀ for a batch x (b, T, in), from `_stack_rows`' factors (the scale is already in B)."""
    if kind == "dense":
        return lambda x: torch.bmm(x, f[0])
    return lambda x: torch.bmm(torch.bmm(x, f[0]), f[1])


def row_deltas(model: nn.Module, updates: Sequence[Update | None]) -> AbstractContextManager[None]:
    """Hooks that add row b's ΔW (x·Aᵀ·Bᵀ) to the output of every module it touches, for the block."""
    deltas = {}
    for name in sorted({n for u in updates if u is not None for n in u.modules}):
        lin = get_module(model, name)
        rows = [None if u is None else u.modules.get(name) for u in updates]
        deltas[name] = _row_delta(*_stack_rows(rows, tuple(lin.weight.shape), lin.weight.dtype, lin.weight.device))
    return add_to_outputs(model, deltas)


class Engine:
    """Scores (item, update) pairs with a per-item activation cache and batched per-row updates."""

    def __init__(self, model: nn.Module, tokenizer, modules: Sequence[str], *, norm: str = "token",
                 batch_rows: int = 16):
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise MergeabilityError(f"the fast engine supports Llama-style models, not {type(model).__name__}: "
                                    "use --engine plain")
        if getattr(model.config, "final_logit_softcapping", None):  # Gemma 2: the engine calls lm_head directly
            raise MergeabilityError(f"the fast engine does not soft-cap {type(model).__name__}'s logits: "
                                    "use --engine plain")
        self.model, self.tokenizer, self.norm, self.batch_rows = model, tokenizer, norm, batch_rows
        self.modules = set(modules)
        self.layers = decoder_layers(model)
        idx = [layer_index(m) for m in modules]
        self.first = min(i for i in idx if i is not None) if all(i is not None for i in idx) else 0
        self._cache: dict[str, tuple[Packed, Tensor]] = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ the two halves of the model

    def _run(self, h: Tensor, bias: Tensor, pos: Tensor, layers: range) -> Tensor:
        inputs = attention_inputs(self.model, h, pos, bias)  # per layer: Gemma 3 mixes sliding and full attention
        for i in layers:
            layer_bias, pe = inputs[i]
            out = self.layers[i](h, attention_mask=layer_bias, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def lower(self, ids: Tensor, pos: Tensor, bias: Tensor) -> Tensor:
        """Hidden states entering the first adapted layer (the embeddings when that is layer 0)."""
        h = self.model.model.embed_tokens(ids)
        return self._run(h, bias, pos, range(self.first))

    def upper(self, h: Tensor, pos: Tensor, bias: Tensor) -> Tensor:
        """Final normed hidden states from layer `first` on."""
        return self.model.model.norm(self._run(h, bias, pos, range(self.first, len(self.layers))))

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def cache(self, items: Sequence[MCItem]) -> None:
        for it in items:
            if it.id in self._cache:
                continue
            p = pack(self.tokenizer, it)
            dev = self.device
            bias = attention_bias([p.seg], len(p.ids), self.dtype).to(dev)
            h = self.lower(p.ids[None].to(dev), p.pos[None].to(dev), bias)
            self._cache[it.id] = (p, h[0])

    def _check(self, update: Update | None) -> None:
        if update is not None and not set(update.modules) <= self.modules:
            extra = sorted(set(update.modules) - self.modules)[0]
            raise MergeabilityError(f"update touches {extra}, outside the engine's modules: build the engine with it")

    @torch.no_grad()
    def score(self, requests: Sequence[tuple[MCItem, Update | None]]) -> list[ItemScore]:
        """One ItemScore per (item, update) request, in order; None means the base model."""
        for _, u in requests:
            self._check(u)
        self.cache([it for it, _ in requests])
        results: list[ItemScore] = []
        for s in range(0, len(requests), self.batch_rows):
            results += self._score_batch(requests[s : s + self.batch_rows])
        return results

    def _score_batch(self, batch) -> list[ItemScore]:
        dev, dt = self.device, self.dtype
        packs = [self._cache[it.id][0] for it, _ in batch]
        h = pad_rows([self._cache[it.id][1] for it, _ in batch], 0)  # cached hidden states, on the device
        pos = pad_rows([p.pos for p in packs], 0).to(dev)
        bias = attention_bias([p.seg for p in packs], h.shape[1], dt).to(dev)
        with row_deltas(self.model, [u for _, u in batch]):
            hidden = self.upper(h, pos, bias)
        rows = torch.cat([torch.full((len(p.predict_at),), b) for b, p in enumerate(packs)]).to(dev)
        cols = torch.cat([p.predict_at for p in packs]).to(dev)
        logp = self.model.lm_head(hidden[rows, cols]).float().log_softmax(-1)  # one head call per batch
        tok_lp = logp.gather(-1, torch.cat([p.targets for p in packs]).to(dev)[:, None])[:, 0].double().cpu()
        out, k = [], 0
        for p in packs:
            K = len(p.targets)
            total = torch.zeros(len(p.n_tokens), dtype=torch.float64).index_add_(0, p.option_of, tok_lp[k : k + K])
            k += K
            out.append(ItemScore(tuple(normalise_scores(total, p.n_tokens, p.n_chars, self.norm).tolist()), p.gold))
        return out
