"""Per-update features of a run, read from its store and joined with the scores."""

from __future__ import annotations

import json

import numpy as np

FEATURES = {  # name -> (label for tables and figures, SQL expression over items i and updates u)
    "gold_prob": ("base p(gold)", "i.gold_prob"),
    "gold_rank": ("base rank of gold", "i.gold_rank"),
    "gap": ("base gap p(top) − p(gold)", "i.gap"),
    "post_margin": ("post-training margin p(gold) − p(runner-up)", "u.post_scores"),
    "prob_gain": ("post − base p(gold)", "u.post_gold_prob - i.gold_prob"),
    "passage_ppl": ("passage perplexity", "u.passage_ppl"),
    "passage_tokens": ("passage tokens", "u.passage_tokens"),
    "fro_norm": ("‖ΔW‖_F", "u.fro_norm"),
    "top_sv": ("σ_max(ΔW)", "u.top_sv"),
    "s_pop": ("popularity (log10)", "log10(max(i.s_pop, 1))"),
}


def load_features(store, scores: dict[str, float]) -> dict[str, np.ndarray]:
    """Arrays aligned by update id: 'id', 'score', and every feature in FEATURES."""
    store.db.create_function("log10", 1, lambda x: float(np.log10(x)) if x and x > 0 else None)
    cols = ", ".join(f"{sql} AS {name}" for name, (_, sql) in FEATURES.items())
    rows = store.rows(f"SELECT i.id AS id, i.relation AS relation, {cols} FROM items i "
                      "JOIN updates u ON u.item_id = i.id WHERE u.kept = 1 ORDER BY i.id")
    rows = [r for r in rows if r["id"] in scores]
    out = {"id": np.array([r["id"] for r in rows]), "relation": np.array([r["relation"] for r in rows]),
           "score": np.array([scores[r["id"]] for r in rows], dtype=float)}
    for name in FEATURES:
        if name == "post_margin":  # kept updates have gold on top, so the post-training gap is 0: use the margin
            out[name] = np.array([_margin(r[name]) for r in rows], dtype=float)
        else:
            out[name] = np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=float)
    return out


def _margin(post_scores_json: str | None) -> float:
    if not post_scores_json:
        return np.nan
    s = np.array(json.loads(post_scores_json), dtype=float)
    p = np.exp(s - s.max())
    p /= p.sum()
    top2 = np.sort(p)[-2:]
    return float(top2[1] - top2[0])
