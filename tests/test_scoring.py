import pytest
import torch

from conftest import word_facts
from mergeability.data import build_items
from mergeability.models import load_model
from mergeability.scoring import encode, normalise_scores, score_item


def plain_scores(model, tok, item, norm):
    """The obvious computation: one full forward per option, no cache, no gathering."""
    enc = encode(tok, item)
    out = []
    for opt, chars in zip(enc.options, enc.option_chars):
        ids = torch.tensor([enc.prompt + opt])
        with torch.no_grad():
            logp = model(ids).logits[0].double().log_softmax(-1)
        P = len(enc.prompt)
        total = sum(logp[P - 1 + j, t].item() for j, t in enumerate(opt))
        n_tok, n_chr = torch.tensor(float(len(opt))), torch.tensor(float(chars))
        out.append(normalise_scores(torch.tensor(total), n_tok, n_chr, norm).item())
    return out


@pytest.mark.parametrize("norm", ["token", "char", "none"])
def test_batched_scoring_matches_per_option_forward(tiny_model_dir, norm):
    lm = load_model(str(tiny_model_dir))
    items = build_items(word_facts(), seed=0)
    for it in items[:6]:
        s = score_item(lm.model, lm.tokenizer, it, norm)
        ref = plain_scores(lm.model, lm.tokenizer, it, norm)
        assert max(abs(a - b) for a, b in zip(s.scores, ref)) < 1e-4
        assert s.pred == max(range(8), key=lambda i: ref[i])


def test_item_score_derived_quantities():
    from mergeability.scoring import ItemScore

    s = ItemScore((-1.0, -0.5, -2.0), gold=0)
    assert s.pred == 1 and not s.correct and s.gold_rank == 1
    p = s.probs
    assert abs(sum(p) - 1) < 1e-12 and abs(s.gap - (p[1] - p[0])) < 1e-12
    top = ItemScore((-0.1, -0.5), gold=0)
    assert top.correct and top.gap == 0 and top.gold_rank == 0
