"""Exact-match scoring for task-level mergeability: batched greedy generation with a stop rule, a normalised
comparison against any reference, and task accuracy.

Prompts are never truncated: Lots-of-LoRAs prompts run to 1,600 tokens and the instance is at their end, so a
prompt the model cannot hold is an error, not a silently different question.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
from torch import Tensor

from mergeability.batching import cache_kwarg, common_prefix, pad_rows, padding_mask, prefix_cache
from mergeability.data.tasks import Example
from mergeability.errors import MergeabilityError
from mergeability.updates import Update, applied

_EDGE_PUNCT = string.punctuation + "“”‘’"


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, strip punctuation at either end. Articles are kept: in generation tasks
    they are content (the letter 'a' is an answer)."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCT + " ")


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(r) for r in references)


def stop_ids(tokenizer) -> list[int]:
    """EOS and every token whose text holds a newline: generation stops at the end of the answer line.
    Computed once per tokenizer object (decoding a 49k vocabulary takes a moment) and kept on it."""
    cached = getattr(tokenizer, "_mergeability_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, t in enumerate(texts) if "\n" in t]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        cached = sorted(set(ids))
        tokenizer._mergeability_stop_ids = cached
    return cached


def answer_budget(tokenizer, examples: Sequence[Example], extra: int = 4, cap: int = 64) -> int:
    """New tokens to allow: the longest reference plus a margin (a wrong answer may run on; it stays wrong)."""
    longest = max(len(tokenizer(" " + r, add_special_tokens=False).input_ids) for e in examples for r in e.outputs)
    return min(cap, longest + extra)


MIN_SHARED = 8  # below this a shared-prefix pass costs more than it saves


def _prefix_layout(rows: Sequence[Sequence[int]], P: int, pad: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of rows that share their first P tokens, laid out as [shared prefix | padding | own
    tokens]: the prefix's cached keys/values then sit at the same positions in every row, and every row's last
    token is the last column, where generation continues."""
    own = [r[P:] for r in rows]
    width = max(len(o) for o in own)
    ids = torch.cat([pad_rows([rows[0][:P]] * len(rows), pad), pad_rows(own, pad, width, left=True)], 1)
    mask = torch.cat([padding_mask([P] * len(rows), P), padding_mask([len(o) for o in own], width, left=True)], 1)
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations, cut at the first newline. Prompts are batched by length; the prompt prefix a batch
    shares (a task's definition and examples) is run once and its keys/values broadcast to every row, which
    is laid out as [shared prefix | padding | own tokens]."""
    enc = [tokenizer(p).input_ids for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None)
    for ids in enc:
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise MergeabilityError(f"a prompt of {len(ids)} tokens plus {max_new_tokens} new ones exceeds the "
                                    f"model's context of {limit} tokens: use a model with a longer context")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(enc)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        P = common_prefix([enc[i] for i in idx]) if len(idx) > 1 else 0
        P = P if P >= MIN_SHARED else 0
        ids, mask = (t.to(dev) for t in _prefix_layout([enc[i] for i in idx], P, pad))
        T = ids.shape[1]
        extra = {cache_kwarg(model): prefix_cache(model, ids[:1, :P], len(idx))} if P else {}
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids(tokenizer), pad_token_id=pad, num_beams=1, temperature=None,
                             top_p=None, top_k=None, **extra)
        for b, i in enumerate(idx):
            text = tokenizer.decode(gen[b, T:], skip_special_tokens=True)
            out[i] = text.split("\n", 1)[0].strip()
    return out


def evaluate_task(model, tokenizer, examples: Sequence[Example], update: Update | None = None, *,
                  batch_size: int = 16, max_new_tokens: int | None = None) -> tuple[float, list[bool], list[str]]:
    """(accuracy, per-example correctness, predictions) of the model, with `update` added to its weights."""
    budget = max_new_tokens or answer_budget(tokenizer, examples)
    prompts = [e.input for e in examples]
    if update is None:
        preds = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    else:
        with applied(model, update):
            preds = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    correct = [exact_match(p, e.outputs) for p, e in zip(preds, examples)]
    return sum(correct) / len(correct), correct, preds
