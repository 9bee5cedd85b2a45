"""What an update does to the model's hidden state at its own prompts, next to what the pool's mean update does
there: a predictive feature of `mergeability predict` and `plan` that needs forward passes but no merge trial.

A merge hands each member roughly the pool's mean update. If the mean moves the last hidden state at the member's
prompt the way the member alone does (cosine near 1, ratio near 1), the member's answer is likely to survive;
if the mean barely moves it, or moves it elsewhere, the member's knowledge is diluted away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mergeability.merging import get_method
from mergeability.updates import Update, applied

BATCH = 16  # prompts per forward pass


@torch.no_grad()
def last_hidden(model, tokenizer, prompts: Sequence[str], update: Update | None = None) -> torch.Tensor:
    """The final layer's hidden state at each prompt's last token (float64, one row per prompt)."""
    rows = []
    for s in range(0, len(prompts), BATCH):
        enc = tokenizer(list(prompts[s:s + BATCH]), return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token of each row
        if tokenizer.padding_side == "left":
            last = torch.full_like(last, enc["attention_mask"].shape[1] - 1)
        if update is None:
            out = model(**enc, output_hidden_states=True)
        else:
            with applied(model, update):
                out = model(**enc, output_hidden_states=True)
        h = out.hidden_states[-1]
        rows.append(h[torch.arange(h.shape[0]), last].double().cpu())
    return torch.cat(rows)


def _shift_features(own: torch.Tensor, pool: torch.Tensor) -> dict[str, float]:
    """Mean over prompts of ‖pool shift‖ / ‖own shift‖ and of the cosine between the two shifts."""
    n_own, n_pool = own.norm(dim=1), pool.norm(dim=1)
    ratio = (n_pool / n_own.clamp_min(1e-12)).numpy()
    cos = ((own * pool).sum(1) / (n_own * n_pool).clamp_min(1e-12)).numpy()
    return {"shift_ratio": float(np.mean(ratio)), "shift_cos": float(np.mean(cos))}


def hidden_shifts(model, tokenizer, prompts: Mapping[str, Sequence[str]], updates: Mapping[str, Update],
                  progress=None) -> dict[str, dict[str, float]]:
    """id -> {"shift_ratio", "shift_cos"}: each update's own shift of the last hidden state at its prompts against
    the shift the pool's mean update (every update of `updates`, equal weights) causes at the same prompts.
    `progress()` is called once per update."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = list(updates)
    flat = [p for i in ids for p in prompts[i]]
    mean = get_method("mean").reference([updates[i] for i in ids])  # dense: one matrix, however many updates
    base, pooled = last_hidden(model, tokenizer, flat), last_hidden(model, tokenizer, flat, mean)
    out, at = {}, 0
    for i in ids:
        k = len(prompts[i])
        own = last_hidden(model, tokenizer, prompts[i], updates[i])
        out[i] = _shift_features(own - base[at:at + k], pooled[at:at + k] - base[at:at + k])
        at += k
        if progress:
            progress()
    return out
