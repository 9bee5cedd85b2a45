"""Exact-match scoring for task-level mergeability: batched greedy generation with a stop rule, a normalised
comparison against any reference, and task accuracy.

Prompts are never truncated: Lots-of-LoRAs prompts run to 1,600 tokens and the instance is at their end, so a
prompt the model cannot hold is an error, not a silently different question.
"""

from __future__ import annotations

import string
from typing import Sequence

import torch

from mergeability.data.tasks import Example
from mergeability.errors import MergeabilityError

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


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return max(n, 0)


MIN_SHARED = 8  # below this a shared-prefix pass costs more than it saves


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations, cut at the first newline. Prompts are batched by length; the prompt prefix a batch
    shares (a task's definition and examples) is run once and its keys/values broadcast to every row, which
    is laid out as [shared prefix | padding | own tokens]."""
    enc = [tokenizer(p).input_ids for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None)
    for p, ids in zip(prompts, enc):
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
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        ids[:, :P] = torch.tensor(enc[idx[0]][:P])
        mask[:, :P] = 1
        for b, i in enumerate(idx):
            own = enc[i][P:]
            ids[b, T - len(own) :] = torch.tensor(own)
            mask[b, T - len(own) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        extra = {}
        if P:
            from transformers import DynamicCache

            cache = DynamicCache()
            model(input_ids=ids[:1, :P], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(idx))
            extra["past_key_values"] = cache
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids(tokenizer), pad_token_id=pad, num_beams=1, temperature=None,
                             top_p=None, top_k=None, **extra)
        for b, i in enumerate(idx):
            text = tokenizer.decode(gen[b, T:], skip_special_tokens=True)
            out[i] = text.split("\n", 1)[0].strip()
    return out


def evaluate_task(model, tokenizer, examples: Sequence[Example], update=None, *, batch_size: int = 16,
                  max_new_tokens: int | None = None) -> tuple[float, list[bool], list[str]]:
    """(accuracy, per-example correctness, predictions) of the model, with `update` added to its weights."""
    from mergeability.updates import applied

    budget = max_new_tokens or answer_budget(tokenizer, examples)
    prompts = [e.input for e in examples]
    if update is None:
        preds = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    else:
        with applied(model, update):
            preds = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    correct = [exact_match(p, e.outputs) for p, e in zip(preds, examples)]
    return sum(correct) / len(correct), correct, preds
