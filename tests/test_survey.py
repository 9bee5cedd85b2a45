"""The task survey (`mergeability tasks survey`) on a tiny random model: the NI fixture pool and a hand-made pool.

The NI fixture's prompts run to a few hundred tokens (definitions of real tasks), so the model here is the tiny
Llama of conftest with a longer context; its word-level tokenizer reads real text as unknown tokens, which is all a
random model needs.
"""

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import TARGETS, run_cli, save_tiny, write_rows
from mergeability.config import from_flat
from mergeability.data import natural_instructions as ni
from mergeability.data import tasks as tasks_module
from mergeability.data.tasks import SPLITS, Example, SplitFiles, Task, read_split
from mergeability.errors import MergeabilityError
from mergeability.pipelines import survey
from mergeability.pipelines.survey import COLUMNS, majority, run_survey
from mergeability.pipelines.tasks import load_task_pool

FIXTURE = Path(__file__).parent / "fixtures" / "natural_instructions"
QUIET = Console(file=io.StringIO())
NI_NAMES = ["task036_qasc_topic_word_to_generate_related_fact", "task047_miscellaneous_answering_science_questions",
            "task050_multirc_answerability"]


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("long-tiny"), max_position_embeddings=1024)


@pytest.fixture
def ni_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ni, "bigbench_folder", lambda path_inside, console=None: FIXTURE)


def cfg_for(model_dir, pool, **kw):
    base = dict(model=str(model_dir), pool=str(pool), rank=2, alpha=4, lr=0.05, epochs=1, batch_size=4, seed=0,
                targets=TARGETS)
    return from_flat("tasks", **{**base, **kw})


def _ex(*outputs):
    return Example("x", "prompt", tuple(outputs))


# ---------------------------------------------------------------------------------------------- majority rate


def test_majority_rate_known_answers():
    # "no" is accepted by 3 of 4 items: "No." and "no" normalise alike, and an item with several references counts
    assert majority([_ex("No."), _ex("no"), _ex("Yes."), _ex("maybe", "No")]) == ("no", 0.75)
    assert majority([_ex("No", "no."), _ex("yes")]) == ("no", 0.5)  # one item counts once, however many spellings
    assert majority([_ex("b"), _ex("a")]) == ("a", 0.5)  # a tie goes to the first answer alphabetically
    assert majority([_ex("b"), _ex("a")]) == majority([_ex("a"), _ex("b")])
    with pytest.raises(MergeabilityError, match="needs at least one"):
        majority([])


# ---------------------------------------------------------------------------------------------- the survey


def _check_rows(rows, names):
    assert [r["task"] for r in rows] == names
    for r in rows:
        assert set(r) == set(COLUMNS)
        for c in ("majority", "base_acc", "ft_acc", *survey.SCALE_COLUMNS):
            assert 0.0 <= r[c] <= 1.0, (r["task"], c)
        assert r["acc_s1"] == r["ft_acc"] and r["prompt_tokens"] > 0 and r["train_loss"] > 0


def test_survey_of_the_natural_instructions_fixture(long_tiny_dir, ni_fixture, tmp_path):
    out = tmp_path / "survey"
    rows = run_survey(cfg_for(long_tiny_dir, "natural-instructions"), out, console=QUIET)
    _check_rows(rows, NI_NAMES)
    assert [(r["n_train"], r["n_test"]) for r in rows] == [(8, 1), (8, 1), (16, 2)]
    # the fixture's test items, by hand: task050's two are both "No.", task047's one is "C."
    assert [(r["majority_answer"], r["majority"]) for r in rows][1:] == [("c", 1.0), ("no", 1.0)]
    assert rows[0]["prompt_tokens"] > 80  # the definition is in every prompt
    with (out / "survey.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and [r["task"] for r in table] == NI_NAMES
    md = (out / "survey.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and len(md) == 2 + 3
    assert all((out / "updates" / n / "adapter_config.json").exists() for n in NI_NAMES)


def _known_pool(root: Path) -> Path:
    """Two tasks in the tiny vocabulary; task001's test references give a majority rate of 3/4 by hand."""
    train = [{"id": f"t{i}", "input": f"w{i} w{i + 1} w99", "output": [f"w{100 + i % 3}"]} for i in range(8)]
    test1 = [["w1"], ["W1"], ["w2"], ["w3", "w1"]]  # "w1" is accepted by three of four items
    test2 = [["w5"], ["w6"], ["w7"]]  # three answers, one item each: 1/3
    for name, test in (("task001_known", test1), ("task002_even", test2)):
        write_rows(root / "datasets" / name / "train.jsonl", train)
        write_rows(root / "datasets" / name / "test.jsonl",
                   [{"id": f"q{i}", "input": f"w{20 + i} w30 w99", "output": o} for i, o in enumerate(test)])
    return root


def test_survey_majority_rate_on_a_known_pool(long_tiny_dir, tmp_path):
    pool = _known_pool(tmp_path / "pool")
    rows = run_survey(cfg_for(long_tiny_dir, pool, max_new_tokens=1), tmp_path / "out", max_train=4, console=QUIET)
    _check_rows(rows, ["task001_known", "task002_even"])
    assert [(r["majority_answer"], r["majority"]) for r in rows] == [("w1", 0.75), ("w5", pytest.approx(1 / 3))]
    assert [(r["n_train"], r["n_test"]) for r in rows] == [(4, 4), (4, 3)]


def test_the_scaled_accuracies_evaluate_the_adapter_alone_at_each_scale(long_tiny_dir, tmp_path, monkeypatch):
    norms = []  # ‖ΔW‖ of the update each evaluation adds (None: the base model)
    real = survey.task_accuracy

    def recording(cfg, model, tok, task, update=None):
        norms.append(None if update is None else update.fro_norm())
        return real(cfg, model, tok, task, update)

    monkeypatch.setattr(survey, "task_accuracy", recording)
    pool = _known_pool(tmp_path / "pool")
    run_survey(cfg_for(long_tiny_dir, pool, tasks=["1"], max_new_tokens=1), tmp_path / "out", console=QUIET)
    base, ft, *scaled = norms
    assert base is None and ft > 0
    assert scaled == [pytest.approx(s * ft, rel=1e-5) for s in survey.SCALES if s != 1.0]


def _eager_task_dir(path: Path) -> Task:
    """A task as the pool loaded it before it was lean: every row of every split file, read at once."""
    files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()}
    return Task(path.name, {s: read_split(f) for s, f in files.items()})


def test_the_lean_survey_gives_the_rows_of_the_eager_one(long_tiny_dir, ni_fixture, tmp_path, monkeypatch):
    cfg = cfg_for(long_tiny_dir, "natural-instructions", max_test=1)
    lean = run_survey(cfg, tmp_path / "lean", max_train=5, console=QUIET)
    monkeypatch.setattr(tasks_module, "load_task_dir", _eager_task_dir)
    assert not isinstance(load_task_pool(cfg, train_missing=True)[0].splits, SplitFiles)  # the patch took
    eager = run_survey(cfg, tmp_path / "eager", max_train=5, console=QUIET)
    assert lean == eager and [(r["n_train"], r["n_test"]) for r in lean] == [(5, 1)] * 3


def test_the_survey_and_the_run_read_only_the_rows_they_use(long_tiny_dir, tmp_path, monkeypatch):
    pool = _known_pool(tmp_path / "pool")
    for name in ("task001_known", "task002_even"):  # a bad row after the rows used, and a valid split never used
        tdir = pool / "datasets" / name
        for split, used in (("train", 4), ("test", 2)):
            lines = (tdir / f"{split}.jsonl").read_text().splitlines(keepends=True)
            (tdir / f"{split}.jsonl").write_text("".join(lines[:used]) + "{not json\n" + "".join(lines[used:]))
        (tdir / "valid.jsonl").write_text("{not json\n")
    rows = run_survey(cfg_for(long_tiny_dir, pool, max_test=2, max_new_tokens=1), tmp_path / "out", max_train=4,
                      console=QUIET)
    assert [(r["n_train"], r["n_test"]) for r in rows] == [(4, 2), (4, 2)]
    assert len(load_task_pool(cfg_for(long_tiny_dir, pool, max_test=2), train_missing=False)) == 2  # run tasks too
    with pytest.raises(MergeabilityError, match=r"test.jsonl, row 3: invalid JSON"):  # reading on: found up front
        load_task_pool(cfg_for(long_tiny_dir, pool, max_test=3), train_missing=False)
    monkeypatch.setattr(survey, "load_task_model", lambda *a: pytest.fail("the model loaded before the check"))
    with pytest.raises(MergeabilityError, match=r"train.jsonl, row 5: invalid JSON"):  # found before any work
        run_survey(cfg_for(long_tiny_dir, pool, max_test=2), tmp_path / "all", max_train=5, console=QUIET)


def test_survey_resumes_per_task_and_refuses_other_settings(long_tiny_dir, tmp_path, monkeypatch):
    pool, out = _known_pool(tmp_path / "pool"), tmp_path / "out"
    first = run_survey(cfg_for(long_tiny_dir, pool, tasks=["task001_known"]), out, console=QUIET)
    surveyed = []
    real = survey.survey_task
    monkeypatch.setattr(survey, "survey_task",
                        lambda prep, task, *a: surveyed.append(task.name) or real(prep, task, *a))
    rows = run_survey(cfg_for(long_tiny_dir, pool), out, console=QUIET)
    assert surveyed == ["task002_even"] and rows[0] == first[0]  # the recorded task is not surveyed again
    state = json.loads((out / "survey.json").read_text())
    assert [r["task"] for r in state["rows"]] == ["task001_known", "task002_even"]
    with pytest.raises(MergeabilityError, match=r"holds a survey with other settings \(max_test\)"):
        run_survey(cfg_for(long_tiny_dir, pool, max_test=2), out, console=QUIET)
    assert json.loads((out / "survey.json").read_text()) == state  # refused: nothing rewritten


def test_the_base_only_screen_gives_the_surveys_base_columns_and_trains_nothing(long_tiny_dir, tmp_path, monkeypatch):
    pool = _known_pool(tmp_path / "pool")
    cfg = cfg_for(long_tiny_dir, pool, max_new_tokens=1)
    full = run_survey(cfg, tmp_path / "full", max_train=4, console=QUIET)
    monkeypatch.setattr(survey, "adapter_for", lambda *a: pytest.fail("the screen trained an adapter"))
    console = Console(file=io.StringIO(), width=100)
    screen = run_survey(cfg, tmp_path / "screen", base_only=True, console=console)
    measured = ["task", "n_test", "majority_answer", "majority", "base_acc", "prompt_tokens"]
    assert [{c: r[c] for c in measured} for r in screen] == [{c: r[c] for c in measured} for r in full]
    assert all(r[c] is None for r in screen for c in COLUMNS if c not in measured)
    assert not (tmp_path / "screen" / "updates").exists()
    with (tmp_path / "screen" / "survey.csv").open() as f:
        assert [r["ft_acc"] for r in csv.DictReader(f)] == ["", ""]
    assert "| - |" in (tmp_path / "screen" / "survey.md").read_text() and " - " in console.file.getvalue()
    with pytest.raises(MergeabilityError, match=r"other settings \(base_only\)"):  # a screen is not a survey
        run_survey(cfg, tmp_path / "screen", console=QUIET)


def test_survey_bad_input_is_one_line_and_writes_nothing(long_tiny_dir, tmp_path):
    pool = _known_pool(tmp_path / "pool")
    (pool / "datasets" / "task002_even" / "test.jsonl").unlink()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    for out, kw, problem in [(tmp_path / "a", {}, "task002_even has no test split"),
                             (tmp_path / "b", {"max_train": 0}, "--max-train must be at least 1, got 0"),
                             (busy, {"tasks": ["1"]}, "holds no survey.json"),
                             (tmp_path / "c", {"max_train": 4, "base_only": True},
                              "--max-train has no effect with --base-only")]:
        with pytest.raises(MergeabilityError, match=problem) as e:
            cfg = cfg_for(long_tiny_dir, pool, **{k: v for k, v in kw.items() if k not in ("max_train", "base_only")})
            run_survey(cfg, out, max_train=kw.get("max_train"), base_only=kw.get("base_only", False), console=QUIET)
        assert "\n" not in str(e.value) and not (out / "survey.json").exists()


def test_the_cli_surveys_a_pool(long_tiny_dir, ni_fixture, tmp_path, capsys):
    out = tmp_path / "cli"
    code, stdout, err = run_cli(["tasks", "survey", "natural-instructions", "--model", long_tiny_dir, "--out", out,
                                 "--tasks", "50", "--max-test", "1", "--max-train", "4"], capsys)
    assert code == 0, err
    with (out / "survey.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["n_train"], r["n_test"]) for r in table] == [(NI_NAMES[2], "4", "1")]
    assert "survey.csv" in stdout
    code, _, err = run_cli(["tasks", "survey", "natural-instructions", "--model", long_tiny_dir, "--out",
                            tmp_path / "screen", "--tasks", "50", "--max-test", "1", "--base-only"], capsys)
    with (tmp_path / "screen" / "survey.csv").open() as f:
        assert code == 0 and [(r["task"], r["ft_acc"]) for r in csv.DictReader(f)] == [(NI_NAMES[2], "")], err
    code, _, err = run_cli(["tasks", "survey", str(tmp_path / "nowhere"), "--model", long_tiny_dir], capsys)
    assert code == 2 and err.startswith("error: unknown task pool") and err.count("\n") == 1
