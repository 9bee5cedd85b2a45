"""`mergeability predict` end to end on tiny finished runs (example and task level), the hidden-shift feature
against a plain computation, the saved predictor, and the report section."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import cfg_for, random_update, run_cli, task_cfg_for, word_facts, write_rows
from mergeability import MergeabilityError
from mergeability.activations import hidden_shifts, last_hidden
from mergeability.merging import get_method
from mergeability.pipelines import run_examples, run_tasks
from mergeability.prediction import (
    PREDICTOR,
    PROXY,
    RESULT,
    TABLE,
    Predict,
    load_predictor,
    predict_run,
    task_family,
)
from mergeability.store import Store
from mergeability.updates import applied

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def example_run(tiny_model_dir, tmp_path_factory):
    """A finished example-level run over four relations, then `predict` on it."""
    root = tmp_path_factory.mktemp("predict")
    facts = word_facts(n=40, n_rel=4)
    write_rows(root / "facts.jsonl", [dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop,
                                           question=f.question, possible_answers=json.dumps(list(f.possible_answers)),
                                           passage=f.passage) for f in facts])
    run_examples(cfg_for(tiny_model_dir, root / "facts.jsonl", items=40), root / "run", console=QUIET)
    result = predict_run(root / "run", QUIET, spec=Predict(n_boot=200))
    return root / "run", result


def test_predict_writes_metrics_baselines_and_a_predictor(example_run):
    run_dir, result = example_run
    assert {(run_dir / f).is_file() for f in (PREDICTOR, RESULT, TABLE)} == {True}
    json.loads((run_dir / RESULT).read_text(), parse_constant=lambda c: pytest.fail(f"predict.json holds {c}"))
    names = {e["name"]: e for e in result["evaluations"]}
    assert {"linear", "boosting", "proxy", "gap", "cos_rest", "pairwise_cos", "subspace_overlap"} <= set(names)
    for e in result["evaluations"]:
        assert -1 <= e["rho"] <= 1 and e["n"] == result["n"]
    assert result["level"] == "examples" and result["groups"] == 4 and result["n"] >= 12
    assert set(result["importances"]) == set(result["features"])
    assert sum(b["n"] for b in result["calibration"]) == result["n"]
    prov = result["provenance"]
    assert {"model", "seed", "version", "method", "partners", "trials"} <= set(prov)
    assert result["costs"]["trials"] > 0 and result["costs"]["no_merge_share"] is not None


def test_the_proxy_evaluates_every_update_once_in_sets_of_n_plus_one(example_run):
    run_dir, result = example_run
    store = Store(run_dir / "results.sqlite", lock=False, read_only=True)
    try:
        rows = store.experiment_rows(PROXY)
        subjects = {r["id"]: r["subj"] for r in store.kept_update_rows()}
    finally:
        store.close()
    members = [m for r in rows.values() for m in r["members"]]
    assert sorted(members) == sorted(result["ids"])  # each once
    assert all(len(r["members"]) <= 3 for r in rows.values())  # N = 2 partners
    for r in rows.values():  # merged members never share a subject, as in the run's trials
        assert len({subjects[m] for m in r["members"]}) == len(r["members"])
        assert set(r["correct"]) <= {0, 1}


def test_the_saved_predictor_reproduces_its_fit(example_run):
    run_dir, result = example_run
    saved = load_predictor(run_dir)
    assert saved.features == result["features"] and saved.level == "examples"
    table = np.genfromtxt(run_dir / TABLE, delimiter=",", names=True, dtype=None, encoding="utf-8")
    rows = [{f: float(r[f]) for f in saved.features} for r in table]
    pred = saved.predict(rows)
    assert pred.shape == (result["n"],) and ((pred >= 0) & (pred <= 1)).all()
    assert not np.allclose(pred, pred[0])  # a fitted model, not a constant


def test_predict_resumes_its_proxy_without_new_merges(example_run, monkeypatch):
    run_dir, first = example_run
    calls = {"n": 0}
    import mergeability.experiments.context as context

    orig = context.merge_set_job
    monkeypatch.setattr(context, "merge_set_job", lambda *a: calls.__setitem__("n", calls["n"] + 1) or orig(*a))
    again = predict_run(run_dir, QUIET, spec=Predict(n_boot=200))
    assert calls["n"] == 0
    assert [e["rho"] for e in again["evaluations"]] == [e["rho"] for e in first["evaluations"]]
    # the first predict timed its proxy; a resumed one ran no merge and does not report 0 s as its cost
    assert first["costs"]["proxy"] > 0 and first["costs"]["proxy_share"] > 0
    assert again["costs"]["proxy"] is None and again["costs"]["proxy_share"] is None


def test_the_report_has_a_predict_section(example_run, capsys):
    run_dir, result = example_run
    code, _, err = run_cli(["report", run_dir], capsys)
    assert code == 0, err
    md = (run_dir / "report.md").read_text()
    assert "Predicting the score, cross-validated by relation" in md and "one-merge proxy" in md
    assert (run_dir / "figures" / "predict_calibration.png").is_file()


def test_too_few_groups_is_one_line_and_writes_nothing(tiny_model_dir, dataset, tmp_path):
    run_examples(cfg_for(tiny_model_dir, dataset), tmp_path / "run", console=QUIET)  # two relations
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(MergeabilityError, match="cross-validate"):
        predict_run(tmp_path / "run", QUIET)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_load_predictor_without_one_is_one_line(tmp_path):
    with pytest.raises(MergeabilityError, match="mergeability predict"):
        load_predictor(tmp_path)


@pytest.mark.parametrize("name, family", [("task001_quoref_question_generation", "quoref"),
                                          ("task017_mctaco_wrong_answer_generation_frequency", "mctaco"),
                                          ("copy_word", "copy_word")])
def test_task_family(name, family):
    assert task_family(name) == family


def test_predict_on_a_task_level_run(tiny_model_dir, tmp_path):
    """Twelve tasks in four families: grouped by family, every task scored, the predictor saved."""
    for k in range(12):
        prompts = [f"w{k} w{(3 * i + k) % 50} w{(5 * i) % 40 + 50} w99" for i in range(16)]
        rows = [{"id": f"{k}-{i}", "input": p, "output": [f"w{100 + k}"]} for i, p in enumerate(prompts)]
        d = tmp_path / "pool" / "datasets" / f"task{k + 1:03d}_fam{k % 4}_x"
        write_rows(d / "train.jsonl", rows[:8])
        write_rows(d / "test.jsonl", rows[8:])
    run_tasks(task_cfg_for(tiny_model_dir, tmp_path / "pool", epochs=2), tmp_path / "run", console=QUIET)
    result = predict_run(tmp_path / "run", QUIET, spec=Predict(n_boot=200, prompts=2))
    assert result["level"] == "tasks" and result["groups"] == 4 and result["n"] == 12
    assert {"base_acc", "majority_margin", "gain"} & set(result["features"]) | set(result["dropped"])
    assert load_predictor(tmp_path / "run").level == "tasks"


def test_hidden_shifts_match_a_plain_computation(tiny_model, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shapes = {"model.layers.1.mlp.up_proj": (64, 32)}
    ups = {f"u{i}": random_update(shapes, 2, seed=i, dtype=torch.float32, scale=0.5) for i in range(3)}
    prompts = {"u0": ["w1 w2 w3"], "u1": ["w4 w5", "w6 w7 w8 w9"], "u2": ["w10"]}
    got = hidden_shifts(tiny_model, tok, prompts, ups)
    mean = get_method("mean").reference(list(ups.values()))
    for i, ps in prompts.items():
        ratio, cos = [], []
        for p in ps:  # one prompt at a time, no padding: the obvious computation
            enc = tok(p, return_tensors="pt")
            with torch.no_grad():
                h0 = tiny_model(**enc, output_hidden_states=True).hidden_states[-1][0, -1].double()
                with applied(tiny_model, ups[i]):
                    h1 = tiny_model(**enc, output_hidden_states=True).hidden_states[-1][0, -1].double()
                with applied(tiny_model, mean):
                    hm = tiny_model(**enc, output_hidden_states=True).hidden_states[-1][0, -1].double()
            own, pool = h1 - h0, hm - h0
            ratio.append((pool.norm() / own.norm()).item())
            cos.append(torch.nn.functional.cosine_similarity(own, pool, dim=0).item())
        assert got[i]["shift_ratio"] == pytest.approx(np.mean(ratio), rel=1e-4)
        assert got[i]["shift_cos"] == pytest.approx(np.mean(cos), abs=1e-4)
    assert last_hidden(tiny_model, tok, ["w1 w2 w3", "w1"]).shape == (2, 32)


def test_predict_command_prints_the_table_and_refreshes_the_report(example_run, capsys):
    run_dir, _ = example_run
    code, out, err = run_cli(["predict", run_dir, "--folds", "3"], capsys)
    assert code == 0, err
    assert "grouped CV" in out and "one-merge proxy" in out and "predictor saved" in out
    assert json.loads((run_dir / RESULT).read_text())["provenance"]["predict"]["n_splits"] == 3


@pytest.mark.parametrize("args, message", [(["--folds", "1"], "n_splits"), (["--density", "0"], "density")])
def test_predict_command_bad_settings(example_run, capsys, args, message):
    run_dir, _ = example_run
    code, out, err = run_cli(["predict", run_dir, *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_predict_command_on_a_run_too_small(tiny_model_dir, dataset, tmp_path, capsys):
    run_examples(cfg_for(tiny_model_dir, dataset), tmp_path / "run", console=QUIET)
    code, out, err = run_cli(["predict", tmp_path / "run"], capsys)
    assert code == 2 and err.startswith("error: cannot cross-validate") and err.count("\n") == 1
    assert not (tmp_path / "run" / RESULT).exists()
