"""Per-update features of an example-level run, read from its store and aligned with the scores."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np


def _col(name: str) -> Callable[[dict], float | None]:
    return lambda r: r[name]


def _prob_gain(r: dict) -> float | None:
    a, b = r["post_gold_prob"], r["gold_prob"]
    return None if a is None or b is None else a - b


def _log_popularity(r: dict) -> float | None:
    return None if r["s_pop"] is None else float(np.log10(max(r["s_pop"], 1)))


def _post_margin(r: dict) -> float:
    """p(gold) − p(runner-up) after training: kept updates have gold on top, so their post-training gap is 0."""
    if not r["post_scores"]:
        return math.nan
    s = np.array(json.loads(r["post_scores"]), dtype=float)
    p = np.exp(s - s.max())
    p /= p.sum()
    top2 = np.sort(p)[-2:]
    return float(top2[1] - top2[0])


FEATURES: dict[str, tuple[str, Callable[[dict], float | None]]] = {  # name -> (label, value from a kept-update row)
    "gold_prob": ("base p(gold)", _col("gold_prob")),
    "gold_rank": ("base rank of gold", _col("gold_rank")),
    "gap": ("base gap p(top) − p(gold)", _col("gap")),
    "post_margin": ("post-training margin p(gold) − p(runner-up)", _post_margin),
    "prob_gain": ("post − base p(gold)", _prob_gain),
    "passage_ppl": ("passage perplexity", _col("passage_ppl")),
    "passage_tokens": ("passage tokens", _col("passage_tokens")),
    "fro_norm": ("‖ΔW‖_F", _col("fro_norm")),
    "top_sv": ("σ_max(ΔW)", _col("top_sv")),
    "s_pop": ("popularity (log10)", _log_popularity),
}


def load_features(store, scores: dict[str, float]) -> dict[str, np.ndarray]:
    """Arrays aligned by update id: 'id', 'relation', 'subject', 'score', and every feature in FEATURES."""
    rows = [r for r in store.kept_update_rows() if r["id"] in scores]
    out = {"id": np.array([r["id"] for r in rows]), "relation": np.array([r["relation"] for r in rows]),
           "subject": np.array([r["subj"] for r in rows]),
           "score": np.array([scores[r["id"]] for r in rows], dtype=float)}
    for name, (_, value) in FEATURES.items():
        out[name] = np.array([np.nan if (v := value(r)) is None else v for r in rows], dtype=float)
    return out
