"""Multiple-choice log-likelihood scoring: option scores given the prompt, computed once per item.

The prompt runs once; its key/value cache is repeated across the options, which run as one padded batch.
Only the positions that predict option tokens go through the output head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mergeability.data.mc import MCItem
from mergeability.errors import MergeabilityError

NORMS = ("token", "char", "none")


@dataclass(frozen=True)
class ItemScore:
    scores: tuple[float, ...]  # normalised log-likelihood per option (paper Eq. 4 with norm='token')
    gold: int

    @property
    def probs(self) -> list[float]:
        """Softmax over the option scores."""
        top = max(self.scores)
        e = [math.exp(s - top) for s in self.scores]
        z = sum(e)
        return [x / z for x in e]

    @property
    def pred(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])

    @property
    def correct(self) -> bool:
        return self.pred == self.gold

    @property
    def gold_rank(self) -> int:
        """0 = the gold option scores best."""
        return sum(s > self.scores[self.gold] for s in self.scores)

    @property
    def gap(self) -> float:
        """p(top option) − p(gold); 0 when the gold option is on top."""
        p = self.probs
        return max(p) - p[self.gold]

    @property
    def gold_prob(self) -> float:
        return self.probs[self.gold]


@dataclass(frozen=True)
class Encoded:
    """Token ids of an item: the prompt once, each option's continuation tokens."""

    prompt: list[int]
    options: list[list[int]]
    option_chars: list[int]


def encode(tokenizer, item: MCItem) -> Encoded:
    prompt = tokenizer(item.prompt).input_ids
    opts = [tokenizer(" " + o, add_special_tokens=False).input_ids for o in item.options]
    if any(len(o) == 0 for o in opts):
        raise MergeabilityError(f"item {item.id}: an option tokenises to nothing")
    return Encoded(prompt, opts, [len(" " + o) for o in item.options])


def normalise(total: Tensor, n_tokens: Tensor, n_chars: Tensor, norm: str) -> Tensor:
    if norm == "token":
        return total / n_tokens
    if norm == "char":
        return total / n_chars
    if norm == "none":
        return total
    raise MergeabilityError(f"unknown normalisation {norm!r}: use one of {', '.join(NORMS)}")


def option_logprobs(model, enc: Encoded) -> Tensor:
    """Summed log p(option tokens | prompt) per option, via one prompt pass and one batched option pass."""
    device = next(model.parameters()).device
    n = len(enc.options)
    prompt = torch.tensor([enc.prompt], device=device)
    out = model(prompt, use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts every option's first token
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    L = max(len(o) for o in enc.options)
    ids = torch.zeros(n, L, dtype=torch.long, device=device)
    mask = torch.zeros(n, L, dtype=torch.long, device=device)
    for i, o in enumerate(enc.options):
        ids[i, : len(o)] = torch.tensor(o)
        mask[i, : len(o)] = 1
    total = first[ids[:, 0]]
    if L > 1:
        P = len(enc.prompt)
        attn = torch.cat([torch.ones(n, P, dtype=torch.long, device=device), mask], 1)
        pos = torch.arange(P, P + L, device=device).expand(n, L)
        hidden = model.model(ids, attention_mask=attn, position_ids=pos, past_key_values=cache).last_hidden_state
        # Only positions that predict a following option token reach the (large) output head.
        rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
        logp = model.lm_head(hidden[rows, cols]).float().log_softmax(-1)
        tok_lp = logp.gather(-1, ids[rows, cols + 1][:, None])[:, 0]
        total = total.index_add(0, rows, tok_lp)
    return total


@torch.no_grad()
def score_item(model, tokenizer, item: MCItem, norm: str = "token") -> ItemScore:
    enc = encode(tokenizer, item)
    total = option_logprobs(model, enc)
    n_tok = torch.tensor([len(o) for o in enc.options], dtype=total.dtype, device=total.device)
    n_chr = torch.tensor(enc.option_chars, dtype=total.dtype, device=total.device)
    s = normalise(total, n_tok, n_chr, norm)
    return ItemScore(tuple(s.tolist()), item.gold)


def score_items(model, tokenizer, items: Sequence[MCItem], norm: str = "token", progress=None) -> list[ItemScore]:
    out = []
    for item in items:
        out.append(score_item(model, tokenizer, item, norm))
        if progress is not None:
            progress()
    return out
