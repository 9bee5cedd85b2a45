"""`mergeability plan`: measured on a tiny model end to end (table, JSON, --out, --max-rank, fact files), the choice
rule on made-up retentions, the maximin search judged on the held-out halves (a stub evaluator), a saved predictor
(a fake one), and every bad input as one line with nothing written."""

import json

import numpy as np
import pytest
import torch

from conftest import random_update, run_cli, save_tiny, word_facts, write_rows
from mergeability import load_update, merge, save_update
from mergeability.exact_match import generate
from mergeability.models import load_model
from mergeability.planning import (
    FEATURES,
    HELD,
    KEEP_ALL,
    LEAVE_ONE_OUT,
    SEARCH_MERGES,
    VAL,
    Fix,
    Measured,
    PlanRequest,
    choose,
    fix_evaluations,
    maximin_fix,
    measure,
    prepare,
    write_outputs,
)
from mergeability.updates import applied

MOD = "model.layers.1.mlp.up_proj"
ANSWER = 64  # tokens: exact_match's answer budget is capped at 64, so a 64-token reference is generated whole


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with room for 64-token answers, three adapters (one too weak to change anything, two strong) and
    each adapter's task file: 8 prompts whose reference is the adapter's own greedy answer, so that its alone
    accuracy is 1 and the weak one's base accuracy is 1 too."""
    root = tmp_path_factory.mktemp("plan")
    model_dir = save_tiny(root / "model", max_position_embeddings=128)
    lm = load_model(str(model_dir))
    adapters, evals = [], []
    for k, scale in enumerate([1e-6, 0.5, 0.5]):
        u = random_update({MOD: (64, 32)}, 2, scale=scale, seed=k, dtype=torch.float32, base=str(model_dir))
        adapters.append(save_update(u, root / f"ad{k}"))
        prompts = [f"w{k} w{3 * i + 1} w{5 * i + 2} w{i + 90}" for i in range(8)]
        with applied(lm.model, u):
            answers = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=ANSWER)
        evals.append(root / f"t{k}.jsonl")
        write_rows(evals[-1], [{"id": str(i), "input": p, "output": [a]} for i, (p, a) in enumerate(zip(prompts,
                                                                                                          answers))])
    return model_dir, adapters, evals


@pytest.fixture(scope="module")
def weak_pair(setup, tmp_path_factory):
    """The weak adapter and another as weak, both on its file: a merge that changes nothing (and costs little)."""
    model_dir, adapters, evals = setup
    weak = save_update(random_update({MOD: (64, 32)}, 2, scale=1e-6, seed=9, dtype=torch.float32,
                                     base=str(model_dir)), tmp_path_factory.mktemp("weak") / "weak")
    return model_dir, [adapters[0], weak], [evals[0], evals[0]]


def plan_args(setup, *extra):
    _, adapters, evals = setup
    return ["plan", *adapters, *[x for e in evals for x in ("--eval", e)], *extra]


# -------------------------------------------------------------------------------------------------- end to end


def test_plan_prints_the_table_writes_the_json_and_the_chosen_merge(setup, tmp_path, capsys):
    code, out, err = run_cli(plan_args(setup, "--json", tmp_path / "plan.json", "--out", tmp_path / "m"), capsys)
    assert code == 0, err
    assert "accuracy on the held-out halves" in out and "ad0" in out and "verdict:" in out
    assert "mergeability predict" in out  # no --predictor: how to get one
    rec = json.loads((tmp_path / "plan.json").read_text())
    ads = rec["adapters"]
    assert [a["name"] for a in ads] == ["ad0", "ad1", "ad2"] and rec["method"] == "knots"
    assert all(a["alone"][HELD] == 1.0 and a["n_validation"] == a["n_held_out"] == 4 for a in ads)
    assert ads[0]["base"][HELD] == 1.0 and ads[1]["base"][HELD] == 0.0  # the weak adapter's answers are the base's
    for a in ads:
        assert a["retention"] == pytest.approx(a["merged"][HELD] / a["alone"][HELD])
        assert set(a["features"]) == set(FEATURES) and a["predicted"] is None
        assert a["features"]["gain"] == pytest.approx(a["features"]["ft_acc"] - a["features"]["base_acc"])
    assert not all(a["survives"] for a in ads)  # the strong ones are lost: fixes were tried and reported
    assert [f["name"] for f in rec["fixes"]][:2] == ["base-accuracy weights", "maximin weights"]
    assert rec["fixes"][2]["name"].startswith("leave out ad") and rec["fixes"][2]["kind"] == LEAVE_ONE_OUT
    fixes = [Fix(f["name"], f["kind"], tuple(f["retention"])) for f in rec["fixes"]]
    assert rec["choice"]["fix"] == choose([a["retention"] for a in ads], fixes).fix  # the rule, on the JSON's numbers
    assert rec["versions"]["mergeability"] and rec["rule"] and "choice rule:" in out
    written = load_update(tmp_path / "m")
    plan_meta = written.meta["plan"]
    assert plan_meta["choice"] == (rec["choice"]["fix"] or "the plain merge")
    chosen = next((f for f in rec["fixes"] if f["name"] == rec["choice"]["fix"]), None)
    weights = [1.0, 1.0, 1.0] if chosen is None else [w for w in chosen["weights"] if w > 0]
    assert written.meta["merge"]["weights"] == pytest.approx(weights)
    assert len(written.meta["merge"]["sources"]) == len(weights)


def test_plain_merge_written_when_every_adapter_survives(weak_pair, tmp_path, capsys):
    """Nothing needs fixing, so nothing is proposed and --out is the plain merge."""
    _, adapters, _ = weak_pair
    code, out, err = run_cli(plan_args(weak_pair, "--json", tmp_path / "p.json", "--out", tmp_path / "m"), capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "p.json").read_text())
    assert all(a["survives"] for a in rec["adapters"])
    assert rec["fixes"] == [] and rec["choice"]["fix"] is None and "nothing to fix" in out
    ref = merge([load_update(a) for a in adapters], "knots")
    torch.testing.assert_close(load_update(tmp_path / "m").delta(MOD), ref.delta(MOD))


def test_max_rank_truncates_before_evaluating_and_writing(weak_pair, tmp_path, capsys):
    _, adapters, _ = weak_pair
    code, out, err = run_cli(plan_args(weak_pair, "--max-rank", "1", "--json", tmp_path / "p.json", "--out",
                                       tmp_path / "m"), capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "p.json").read_text())
    from mergeability.interference import truncate

    _, energy = truncate(merge([load_update(a) for a in adapters], "knots"), 1)
    assert rec["max_rank"] == 1 and rec["energy_kept"] == pytest.approx(energy) and rec["energy_kept"] < 1
    assert "--max-rank 1" in out and "after truncation" in out
    assert load_update(tmp_path / "m").modules[MOD].rank == 1


def test_fact_files_are_scored_as_multiple_choice(setup, tmp_path, capsys):
    _, adapters, _ = setup
    facts = word_facts(16)
    files = []
    for k, part in enumerate((facts[:8], facts[8:])):
        files.append(tmp_path / f"f{k}.jsonl")
        write_rows(files[-1], [dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop, question=f.question,
                                    possible_answers=list(f.possible_answers)) for f in part])
    code, out, err = run_cli(["plan", adapters[0], adapters[1], "--eval", files[0], "--eval", files[1], "--json",
                              tmp_path / "p.json"], capsys)
    assert code == 0, err
    ads = json.loads((tmp_path / "p.json").read_text())["adapters"]
    assert [a["format"] for a in ads] == ["facts", "facts"]
    assert all(0 <= a[k][s] <= 1 for a in ads for k in ("base", "alone", "merged") for s in (VAL, HELD))


# ----------------------------------------------------------------------------------------------- the choice rule


def keep(name, *ret):
    return Fix(name, KEEP_ALL, ret)


def test_choice_all_survive_proposes_nothing():
    assert choose([0.9, 1.0, None], [keep("a", 0.1, 0.1, None)]).fix is None


def test_choice_prefers_a_keep_all_fix_that_works_best_worst_first():
    fixes = [keep("a", 0.85, 0.8, 0.9), keep("b", 0.9, 0.95, 0.82), Fix("loo", LEAVE_ONE_OUT, (None, 1.0, 1.0))]
    assert choose([0.9, 0.2, 1.0], fixes).fix == "b"


def test_choice_leave_one_out_only_when_no_keep_all_fix_works():
    fixes = [keep("a", 0.5, 0.6, 0.9), keep("b", 0.3, 0.9, 0.9), Fix("loo", LEAVE_ONE_OUT, (None, 0.9, 0.85))]
    assert choose([0.2, 0.9, 0.9], fixes).fix == "loo"
    failing_loo = Fix("loo", LEAVE_ONE_OUT, (None, 0.9, 0.5))
    assert choose([0.2, 0.9, 0.9], [*fixes[:2], failing_loo]).fix == "a"  # the best worst retention, beating 0.2
    assert choose([0.7, 0.9, 0.9], [*fixes[:2], failing_loo]).fix is None  # nothing beats the plain merge's 0.7


# ------------------------------------------------------------------------------------------ search and held-out


LEVEL = [0.25, 1.0, 1.0]  # each adapter's accuracy under the equal-weight merge: adapter 0 is far behind


def stub_accuracy(i, w, split):
    """Adapter i under a 3-way merge with weights w: its level scaled by its weight over the mean weight, on
    validation; half of that on held-out."""
    share = min(1.0, LEVEL[i] * w[i] * len(w) / sum(w))
    return share if split == VAL else share / 2


class StubEvaluator:
    """Base 0, alone 1, and `stub_accuracy` for a 3-way merge (1 for a smaller one): a search scored on held-out
    numbers, or held-out numbers read from validation, would show."""

    def __init__(self):
        self.calls = []

    def accuracy(self, i, update, split):
        merge_meta = {} if update is None else update.meta.get("merge", {})
        self.calls.append((split, merge_meta.get("weights")))
        if update is None:
            return 0.0
        if len(merge_meta.get("weights", [])) != 3:  # an adapter alone, or the merge of the rest
            return 1.0
        return stub_accuracy(i, merge_meta["weights"], split)


def test_search_is_tuned_on_validation_and_reported_on_held_out(setup):
    _, adapters, evals = setup
    prep = prepare(PlanRequest(tuple(adapters), tuple(evals)))
    ev = StubEvaluator()
    m = Measured(ev, {s: [0.0] * 3 for s in (VAL, HELD)}, {s: [1.0] * 3 for s in (VAL, HELD)})
    plain_val = m.retention(prep.plain, [0.25, 1.0, 1.0], VAL)
    ev.calls.clear()
    fix = maximin_fix(m, prep.merging, prep.plain, plain_val)
    w = fix.merged.weights
    expected = [stub_accuracy(i, w, HELD) for i in range(3)]
    assert fix.retention == pytest.approx(expected)  # the held-out function at the searched weights
    assert fix.weights[0] > fix.weights[1]  # the search raised the adapter that was behind
    searched = [c for c in ev.calls if c[0] == VAL]
    assert len(searched) == 3 * fix.merges and fix.merges <= SEARCH_MERGES * 3
    assert [c[0] for c in ev.calls].count(HELD) == 3  # held-out: only the final check, once per adapter
    assert "budget of 4·K = 12" in fix.note


def test_measure_with_a_stub_reports_held_out_and_writes_the_chosen_fix(setup, tmp_path):
    """No keep-all fix brings adapter 0 to 0.8 on held-out (at most half its validation number); leaving it out
    does: that merge, of the other two, is what --out gets, with the plan in its provenance."""
    _, adapters, evals = setup
    req = PlanRequest(tuple(adapters), tuple(evals), out=tmp_path / "m", json=tmp_path / "p.json")
    plan = measure(prepare(req), StubEvaluator())
    assert plan.merged[HELD] == pytest.approx([v / 2 for v in plan.merged[VAL]])
    assert [f.kind for f in plan.fixes] == [KEEP_ALL, KEEP_ALL, LEAVE_ONE_OUT]
    assert plan.choice == choose(plan.retention, plan.fixes) and plan.choice.fix == "leave out ad0"
    assert write_outputs(plan) == [tmp_path / "p.json", tmp_path / "m"]
    written = load_update(tmp_path / "m")
    assert written.meta["plan"]["choice"] == "leave out ad0" and written.meta["plan"]["left_out"] == str(adapters[0])
    assert written.meta["merge"]["sources"] == [str(a) for a in adapters[1:]]
    ref = merge([load_update(a) for a in adapters[1:]], "knots")
    torch.testing.assert_close(written.delta(MOD), ref.delta(MOD))
    assert json.loads((tmp_path / "p.json").read_text())["choice"]["fix"] == "leave out ad0"


class RecordingBars:
    """console.Bars as a test sees it: each stage's total, advances and whether it finished early."""

    def __init__(self):
        self.stages = {}

    def stage(self, name, total, completed=0):
        bars = self

        class Bar:
            def advance(self, n=1):
                bars.stages[name]["done"] += n

            def finish(self):
                bars.stages[name]["total"] = bars.stages[name]["done"]

        self.stages[name] = {"total": total, "done": completed}
        return Bar()


def test_measure_shows_one_step_per_evaluation(setup):
    """The bars count evaluations: 6 K to measure, then the fixes' (at most `fix_evaluations(K)`, the bar's total
    lowered to what was done when the search stops early)."""
    _, adapters, evals = setup
    ev, bars = StubEvaluator(), RecordingBars()
    measure(prepare(PlanRequest(tuple(adapters), tuple(evals))), ev, bars)
    assert bars.stages["measure"] == {"total": 18, "done": 18}
    fixes = bars.stages["fixes"]
    assert fixes["done"] == fixes["total"] == len(ev.calls) - 18 and 0 < fixes["done"] <= fix_evaluations(3)
    assert fix_evaluations(3) == 3 + (SEARCH_MERGES * 3 + 1) * 3 + 2


# ------------------------------------------------------------------------------------------------ the predictor


class FakePredictor:
    features = ["base_acc", "gain", "cos_rest"]
    level = "tasks"

    def __init__(self):
        self.rows = []

    def predict(self, rows):
        self.rows = rows
        return np.array([0.1 * (i + 1) for i in range(len(rows))])


def test_predictor_scores_are_shown(weak_pair, tmp_path, capsys, monkeypatch):
    import mergeability.planning as planning

    fake = FakePredictor()
    monkeypatch.setattr(planning, "load_predictor", lambda run_dir: fake)
    code, out, err = run_cli(plan_args(weak_pair, "--predictor", tmp_path, "--json", tmp_path / "p.json"), capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "p.json").read_text())
    assert [a["predicted"] for a in rec["adapters"]] == pytest.approx([0.1, 0.2])
    assert rec["predictor"] == {"path": str(tmp_path), "level": "tasks", "features": FakePredictor.features}
    assert len(fake.rows) == 2 and fake.rows[1]["cos_rest"] == rec["adapters"][1]["features"]["cos_rest"]
    assert "mergeability predict" not in out  # the how-to-get-one line is for runs without a predictor


# ------------------------------------------------------------------------------------------------- bad input


def one_line(code, out, err):
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case, message", [
    ("one adapter", "at least two adapters"),
    ("eval count", "got 2 --eval files for 3 adapters"),
    ("eval missing", "does not exist"),
    ("eval neither", "is neither a task file"),
    ("max rank", "--max-rank must be a positive integer, got 0"),
    ("out exists", "already exists"),
    ("different bases", "different base models"),
    ("no predictor", "has no predictor.joblib"),
    ("predictor feature", "'train_loss', which plan cannot compute"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, monkeypatch, case, message):
    model_dir, adapters, evals = setup
    evs = [x for e in evals for x in ("--eval", e)]
    (tmp_path / "exists").mkdir()
    (tmp_path / "odd.jsonl").write_text('{"question": "w1", "answer": "w2"}\n')
    other = save_update(random_update({MOD: (64, 32)}, 2, seed=5, dtype=torch.float32, base="another-model"),
                        tmp_path / "other")
    if case == "predictor feature":
        import mergeability.planning as planning

        bad = FakePredictor()
        bad.features = ["base_acc", "train_loss"]
        monkeypatch.setattr(planning, "load_predictor", lambda run_dir: bad)
    args = {
        "one adapter": ["plan", adapters[0], "--eval", evals[0]],
        "eval count": ["plan", *adapters, *evs[:4]],
        "eval missing": ["plan", *adapters, *evs[:4], "--eval", tmp_path / "nope.jsonl"],
        "eval neither": ["plan", *adapters, *evs[:4], "--eval", tmp_path / "odd.jsonl"],
        "max rank": ["plan", *adapters, *evs, "--max-rank", "0"],
        "out exists": ["plan", *adapters, *evs, "--out", tmp_path / "exists"],
        "different bases": ["plan", adapters[0], other, *evs[:4]],
        "no predictor": ["plan", *adapters, *evs, "--predictor", tmp_path / "exists"],
        "predictor feature": ["plan", *adapters, *evs, "--predictor", tmp_path / "exists"],
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    err = one_line(*run_cli([*args, "--json", tmp_path / "p.json", *(["--out", tmp_path / "m"]
                                                                        if case != "out exists" else [])], capsys))
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not list((tmp_path / "exists").iterdir())
