"""Multiple-choice log-likelihood scoring: option scores, the quantities derived from them, and the plain
(obvious) scorer. The fast scorer with the same interface is `engine.Engine`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergeability.batching import pad_rows, padding_mask
from mergeability.data.mc import MCItem
from mergeability.errors import MergeabilityError
from mergeability.updates import Update, applied

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


def normalise_scores(total: Tensor, n_tokens: Tensor, n_chars: Tensor, norm: str) -> Tensor:
    """Option scores from summed option log-likelihoods: per token, per character, or the sums themselves."""
    if norm == "token":
        return total / n_tokens
    if norm == "char":
        return total / n_chars
    if norm == "none":
        return total
    raise MergeabilityError(f"unknown normalisation {norm!r}: use one of {', '.join(NORMS)}")


def option_logprobs(model, enc: Encoded) -> Tensor:
    """Summed log p(option tokens | prompt) per option: the obvious computation, one full sequence per option
    (prompt + option, right-padded into one batch). The engine computes the same thing far more cheaply."""
    device = next(model.parameters()).device
    P, n = len(enc.prompt), len(enc.options)
    rows = [enc.prompt + o for o in enc.options]
    ids = pad_rows(rows, 0)
    mask = padding_mask([len(r) for r in rows], ids.shape[1])
    logp = model(ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    total = torch.zeros(n, dtype=torch.float64)
    for i, o in enumerate(enc.options):
        pred = logp[i, P - 1 : P - 1 + len(o)]  # position t predicts token t + 1
        total[i] = pred.gather(-1, torch.tensor(o)[:, None]).sum().double()
    return total


@torch.no_grad()
def score_item(model, tokenizer, item: MCItem, norm: str = "token") -> ItemScore:
    """Score one item with the model as it is (the plain path)."""
    enc = encode(tokenizer, item)
    total = option_logprobs(model, enc)
    n_tok = torch.tensor([len(o) for o in enc.options], dtype=total.dtype)
    n_chr = torch.tensor(enc.option_chars, dtype=total.dtype)
    return ItemScore(tuple(normalise_scores(total, n_tok, n_chr, norm).tolist()), item.gold)


class PlainScorer:
    """The obvious path, for checking: the update merged into the weights, the full model, per option."""

    def __init__(self, model, tokenizer, *, norm: str = "token"):
        self.model, self.tokenizer, self.norm = model, tokenizer, norm

    def score(self, requests: Sequence[tuple[MCItem, Update | None]]) -> list[ItemScore]:
        out = []
        for item, update in requests:
            if update is None:
                out.append(score_item(self.model, self.tokenizer, item, self.norm))
            else:
                with applied(self.model, update):
                    out.append(score_item(self.model, self.tokenizer, item, self.norm))
        return out
