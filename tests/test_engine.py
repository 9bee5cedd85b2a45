import copy

import pytest
import torch

from conftest import random_update, word_facts
from mergeability import merge
from mergeability.batching import attention_bias, pad_rows, padding_mask
from mergeability.config import ItemTraining
from mergeability.data import build_items
from mergeability.engine import Engine, pack
from mergeability.models import load_model
from mergeability.scoring import PlainScorer
from mergeability.training import init_factors, split_passage, train_update, train_updates_cached

UP1, Q1, UP0 = "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"
SHAPES = {UP1: (256, 128), Q1: (128, 128), UP0: (256, 128)}


@pytest.fixture(scope="module")
def lm(wide_model_dir):
    return load_model(str(wide_model_dir))


def updates_for(mods, n=6, rank=16):
    ups = [random_update({m: SHAPES[m] for m in mods}, rank, scale=0.05, seed=i, dtype=torch.float32) for i in range(n)]
    knots = merge(ups, "knots", inner="mean")  # rank 6 × 16 = 96 > 64
    assert all(m.rank > 64 for m in knots.modules.values())
    return [None, ups[0], ups[1], knots, merge(ups, "knots"), merge(ups, "ties")]


@pytest.mark.parametrize("mods", [[UP1], [UP1, Q1], [UP0, UP1]], ids=["layer1-up", "layer1-up+q", "from-layer0"])
@pytest.mark.parametrize("norm", ["token", "char"])
def test_engine_matches_plain_path(lm, mods, norm):
    items = build_items(word_facts(), seed=0)[:5]
    reqs = [(it, u) for it in items for u in updates_for(mods)]
    eng = Engine(lm.model, lm.tokenizer, mods, norm=norm, batch_rows=7)  # batches mix items and updates
    assert eng.first == min(int(m.split(".")[2]) for m in mods)
    fast = eng.score(reqs)
    plain = PlainScorer(lm.model, lm.tokenizer, norm=norm).score(reqs)
    for f, p in zip(fast, plain):
        assert max(abs(a - b) for a, b in zip(f.scores, p.scores)) < 1e-4
        assert f.pred == p.pred


def test_engine_matches_plain_path_in_bfloat16(wide_model_dir):
    # What runs with --dtype bfloat16 on a GPU, checked on the CPU: same code, bf16-sized tolerance
    # (measured: 4e-3; float32 gives 5e-7 on these inputs).
    lm16 = load_model(str(wide_model_dir), dtype="bfloat16")
    items = build_items(word_facts(), seed=0)[:5]
    reqs = [(it, u) for it in items for u in updates_for([UP1])]
    fast = Engine(lm16.model, lm16.tokenizer, [UP1], batch_rows=7).score(reqs)
    plain = PlainScorer(lm16.model, lm16.tokenizer).score(reqs)
    for f, p in zip(fast, plain):
        assert max(abs(a - b) for a, b in zip(f.scores, p.scores)) < 2e-2
    assert sum(f.pred == p.pred for f, p in zip(fast, plain)) >= len(reqs) - 1  # a bf16 near-tie may flip


def test_engine_refuses_updates_below_its_cache(lm):
    from mergeability import MergeabilityError

    eng = Engine(lm.model, lm.tokenizer, [UP1])
    item = build_items(word_facts(), seed=0)[0]
    with pytest.raises(MergeabilityError, match="outside the engine's modules"):
        eng.score([(item, random_update({UP0: SHAPES[UP0]}, 2, dtype=torch.float32))])


def test_packed_mask_isolates_options(lm):
    item = build_items(word_facts(), seed=0)[0]
    p = pack(lm.tokenizer, item)
    bias = attention_bias([p.seg], len(p.ids) + 2, torch.float32)[0, 0]
    P = int((p.seg == -1).sum())
    seg = torch.cat([p.seg, torch.tensor([-2, -2])])
    for q in range(len(seg)):
        for k in range(len(seg)):
            visible = bias[q, k] == 0
            if q >= len(p.seg) or k >= len(p.seg):
                assert visible == (q == k)  # padding sees itself only
            else:
                assert visible == (k <= q and (k < P or seg[k] == seg[q]))


def test_pad_rows_and_padding_mask():
    rows = [[5, 6, 7], [8]]
    assert pad_rows(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0]]
    assert pad_rows(rows, -1, 4, left=True).tolist() == [[-1, 5, 6, 7], [-1, -1, -1, 8]]
    assert padding_mask([3, 1], 4, left=True).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    h = pad_rows([torch.ones(2, 3), torch.ones(1, 3)], 0)  # tensor rows keep their trailing dims and dtype
    assert h.shape == (2, 2, 3) and h.dtype == torch.float32 and h[1, 1].abs().sum() == 0


def _peft_train(model, seqs, module, cfg, A0):
    """PEFT on the full model, the textbook loop: each epoch one step per sequence."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                          target_modules=[module]))
    lora = pm.base_model.model.get_submodule(module)
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(A0)
        lora.lora_B["default"].weight.zero_()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.step_lr, weight_decay=0.0)
    for _ in range(cfg.epochs):
        for ids in seqs:
            loss = pm(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lora.scaling["default"] * lora.lora_B["default"].weight.detach() @ lora.lora_A["default"].weight.detach()


def test_split_passage(lm):
    seqs = split_passage(lm.tokenizer, "w1 w2 w3\n\nw4 w5 w6 w7 w8\nw9", max_tokens=3)
    assert [s.tolist()[0] for s in seqs] == [[1, 2, 3], [4, 5, 6], [7, 8]]  # 'w9' alone: nothing to predict


def test_cached_training_matches_peft_training(lm):
    cfg = ItemTraining(rank=8, alpha=16, lr=4e-3, epochs=10)
    seqs = split_passage(lm.tokenizer, word_facts()[3].passage, cfg.max_tokens)
    assert len(seqs) == 3
    A0, _ = init_factors(SHAPES[UP1], cfg.rank, 0, f"k/{UP1}")
    ref = _peft_train(lm.model, seqs, UP1, cfg, A0)
    eng = Engine(lm.model, lm.tokenizer, [UP1])
    cached = train_updates_cached(eng, [seqs], ["k"], [UP1], cfg, seed=0)[0]
    for upd, stats in (cached, train_update(lm.model, seqs, [UP1], cfg, seed=0, key="k")):
        got = upd.delta(UP1)
        assert ref.norm() > 0
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4
        assert stats.input_tokens == sum(s.shape[1] for s in seqs) and stats.base_ppl > 1
        assert upd.meta["training"] == {"update": "lora", "lr": 4e-3, "epochs": 10, "seed": 0, "rank": 8, "alpha": 16}


def test_batched_training_matches_one_at_a_time_and_peft(lm):
    cfg = ItemTraining(rank=8, alpha=16, lr=4e-3, epochs=10)
    facts = word_facts()[:3]
    passages = [split_passage(lm.tokenizer, f.passage, cfg.max_tokens) for f in facts]
    assert len({p[0].shape[1] for p in passages}) > 1  # different lengths: the batch is padded
    eng = Engine(lm.model, lm.tokenizer, [UP1])
    batched = train_updates_cached(eng, passages, [f.id for f in facts], [UP1], cfg, seed=0)
    for f, seqs, (upd, stats) in zip(facts, passages, batched):
        A0, _ = init_factors(SHAPES[UP1], cfg.rank, 0, f"{f.id}/{UP1}")
        ref = _peft_train(lm.model, seqs, UP1, cfg, A0)
        assert ((upd.delta(UP1) - ref).norm() / ref.norm()).item() < 1e-4
        alone, alone_stats = train_update(lm.model, seqs, [UP1], cfg, seed=0, key=f.id)
        assert abs(stats.base_ppl - alone_stats.base_ppl) < 1e-4 * alone_stats.base_ppl
        assert abs(stats.loss - alone_stats.loss) < 1e-3 * alone_stats.loss
        assert stats.input_tokens == alone_stats.input_tokens == sum(s.shape[1] for s in seqs)
