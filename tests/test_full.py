"""Full (dense) updates, paper A.8: training parity with training the weight itself, save/load, and a run."""

import copy
import sqlite3

import torch
from rich.console import Console

from conftest import cfg_for, run_cli, word_facts
from mergeability.config import ItemTraining
from mergeability.engine import Engine
from mergeability.models import get_module, load_model
from mergeability.training import split_passage, train_update, train_updates_cached
from mergeability.updates import Dense, load_update, save_update

UP1 = "model.layers.1.mlp.up_proj"


def weight_trained(model, seqs, name, cfg):
    """The obvious full fine-tune of one module: train its weight with AdamW; ΔW = after − before."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    w = get_module(m, name).weight
    before = w.detach().clone()
    w.requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=cfg.step_lr, weight_decay=0.0)
    for _ in range(cfg.epochs):
        for ids in seqs:
            loss = m(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (w.detach() - before).double()


def test_full_updates_match_training_the_weight(wide_model_dir):
    lm = load_model(str(wide_model_dir))
    cfg = ItemTraining(full_lr=1e-3, epochs=4, update="full")
    facts = word_facts()[:3]
    passages = [split_passage(lm.tokenizer, f.passage, cfg.max_tokens) for f in facts]
    eng = Engine(lm.model, lm.tokenizer, [UP1])
    batched = train_updates_cached(eng, passages, [f.id for f in facts], [UP1], cfg, seed=0)
    for f, seqs, (upd, _) in zip(facts, passages, batched):
        ref = weight_trained(lm.model, seqs, UP1, cfg)
        plain, _ = train_update(lm.model, seqs, [UP1], cfg, seed=0, key=f.id)
        for got in (upd, plain):
            assert isinstance(got.modules[UP1], Dense)
            assert got.meta["training"] == {"update": "full", "lr": 1e-3, "epochs": 4, "seed": 0}  # the lr used
            # (after − before) of a float32 weight carries its rounding: 1e-3 relative is that, not a difference
            assert ((got.delta(UP1).double() - ref).norm() / ref.norm()).item() < 1e-3
        assert ((upd.delta(UP1) - plain.delta(UP1)).norm() / plain.delta(UP1).norm()).item() < 1e-4


def test_dense_updates_save_and_load_as_dense(tmp_path):
    d = Dense(torch.randn(6, 4))
    from mergeability.updates import Update

    save_update(Update({UP1: d}, "tiny"), tmp_path / "u")
    back = load_update(tmp_path / "u")
    assert isinstance(back.modules[UP1], Dense) and torch.equal(back.modules[UP1].weight, d.weight)
    assert "dense_modules" not in back.meta


def test_full_update_run_with_ties(tiny_model_dir, dataset, tmp_path, capsys):  # noqa: F811
    from mergeability.pipelines import run_examples

    s = run_examples(cfg_for(tiny_model_dir, dataset, update="full", full_lr=1e-2, method="ties"), tmp_path / "run",
                     console=Console(quiet=True))
    assert s["kept"] > 2
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    path, = db.execute("SELECT path FROM updates WHERE kept = 1 LIMIT 1").fetchone()
    assert all(isinstance(m, Dense) for m in load_update(tmp_path / "run" / path).modules.values())
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 3 * s["kept"]
    out = tmp_path / "knots"
    code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20",
                            "--partners", "2", "--update", "full", "--method", "knots", "--out", out], capsys)
    assert code == 2 and "knots needs low-rank" in err and not out.exists()
