"""Bad input is one line, found before anything is written (issue #17): every config value checked in one place
(`config.validate`, from YAML, presets and flags alike), merge parameters checked when the method is built, and
the data and model checked in the prepare step, before the run directory exists."""

import dataclasses
import json
import shutil

import pytest

from conftest import cfg_for, run_cli, word_facts
from mergeability.config import (
    PRESETS,
    TASK_PRESETS,
    ExampleConfig,
    TaskConfig,
    from_flat,
    load_config,
    override,
    save_config,
    validate,
)
from mergeability.errors import MergeabilityError
from mergeability.merging import Knots, get_method
from mergeability.pipelines import run_examples, run_tasks

QUIET = None  # run_examples builds its own console; the tests read the exception, not the output


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(MergeabilityError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ------------------------------------------------------------------------------------ flags (override)

OUT_OF_RANGE = [
    ("examples", dict(rank=0), "--rank must be at least 1, got 0"),
    ("examples", dict(rank=-3), "--rank must be at least 1, got -3"),
    ("examples", dict(seed=99999999999999999999999),
     "--seed must be in [0, 4294967295], got 99999999999999999999999"),
    ("examples", dict(seed=-1), "--seed must be in [0, 4294967295], got -1"),
    ("examples", dict(items=2**63), "--items must be below 2^63 (a 64-bit integer), got 9223372036854775808"),
    ("examples", dict(layer=-1), "--layer must be at least 0, got -1"),
    ("tasks", dict(max_test=0), "--max-test must be at least 1, got 0"),
    ("tasks", dict(max_test=-1), "--max-test must be at least 1, got -1"),
    ("examples", dict(items=-5), "--items must be at least 1, got -5"),
    ("examples", dict(per_subject=0), "--per-subject must be at least 1, got 0"),
    ("examples", dict(trials=0), "--trials must be at least 1, got 0"),
    ("examples", dict(partners=-1), "--partners must be at least 0, got -1"),
    ("examples", dict(epochs=0), "--epochs must be at least 1, got 0"),
    ("examples", dict(batch=0), "--batch must be at least 1, got 0"),
    ("examples", dict(train_batch=-2), "--train-batch must be at least 1, got -2"),
    ("examples", dict(batch_rows=0), "--batch-rows must be at least 1, got 0"),
    ("examples", dict(threads=0), "--threads must be at least 1, got 0"),
    ("examples", dict(workers=-2), "--workers must be at least 1, got -2"),
    ("examples", dict(n_options=1), "--n-options must be at least 2, got 1"),
    ("examples", dict(k_shot=-1), "--k-shot must be at least 0, got -1"),
    ("examples", dict(max_tokens=1), "--max-tokens must be at least 2, got 1"),
    ("examples", dict(alpha=0), "--alpha must be greater than 0, got 0"),
    ("examples", dict(lr=-1e-3), "--lr must be greater than 0, got -0.001"),
    ("examples", dict(targets=[]), "--targets must be non-empty, got []"),
    ("tasks", dict(train_size=-1), "--train-size must be at least 1, got -1"),
    ("tasks", dict(test_size=0), "--test-size must be at least 1, got 0"),
    ("tasks", dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    ("tasks", dict(eval_batch=0), "--eval-batch must be at least 1, got 0"),
    ("tasks", dict(max_new_tokens=0), "--max-new-tokens must be at least 1, got 0"),
    ("tasks", dict(threshold=1.5), "--threshold must be in [0, 1], got 1.5"),
    ("tasks", dict(sweep=[0.5, 2]), "--sweep[1] must be in [0, 1], got 2"),
]


@pytest.mark.parametrize("kind, flat, message", OUT_OF_RANGE, ids=[str(c[1]) for c in OUT_OF_RANGE])
def test_flag_out_of_range_is_one_line_naming_the_flag(kind, flat, message):
    assert one_line_error(from_flat, kind, **flat) == message


WRONG_TYPE = [
    (dict(trials=2.5), "--trials: expected an integer ≥ 1, got 2.5"),
    (dict(items="ten"), "--items: expected an integer ≥ 1, got 'ten'"),
    (dict(rank=True), "--rank: expected an integer ≥ 1, got true"),  # a bool is not an integer
    (dict(lr="fast"), "--lr: expected a number > 0, got 'fast'"),
    (dict(alpha=float("nan")), "--alpha: expected a number > 0, got nan"),
    (dict(seed="abc"), "--seed: expected an integer in [0, 4294967295], got 'abc'"),
    (dict(relations="capital"), "--relations: expected a non-empty list of non-empty strings, or null, got 'capital'"),
    (dict(method_params="x"), "--method-params: expected a mapping of names to values, got 'x'"),
    (dict(model=5), "--model: expected a non-empty string, got 5"),
]


@pytest.mark.parametrize("flat, message", WRONG_TYPE, ids=[str(c[0]) for c in WRONG_TYPE])
def test_flag_of_the_wrong_type_is_not_coerced(flat, message):
    assert one_line_error(from_flat, "examples", **flat) == message


CHOICES = [
    (dict(dtype="f8"), "--dtype: unknown dtype 'f8': use float32, float64, bfloat16 or float16"),
    (dict(device="gpu"), "--device: unknown device 'gpu': use cpu, cuda, cuda:N or mps"),
    (dict(device="cuda:x"), "--device: unknown device 'cuda:x'"),
    (dict(engine="turbo"), "--engine: unknown engine 'turbo': use fast or plain"),
    (dict(update="half"), "--update: unknown update 'half': use lora or full"),
    (dict(norm="z"), "--norm: unknown norm 'z': use token, char or none"),
    (dict(distractors="all"), "--distractors: unknown distractors 'all': use relation or any"),
    (dict(backend="spark"), "--backend: unknown backend 'spark': use local, processes or ray"),
    (dict(dataset="nowhere"), "--dataset: unknown dataset 'nowhere': use geo, wikidata, popqa or a"),
    (dict(passages="notes.txt"), "--passages: unknown passages 'notes.txt': use wikipedia or a"),
    (dict(method="soup"), "--method: unknown merge method 'soup': choose one of"),
    (dict(method_params={"density": 5}), "--method-params: density must be in (0, 1], got 5"),
    (dict(method="mean", method_params={"density": 0.5}), "--method-params: mean takes no parameter density"),
]


@pytest.mark.parametrize("flat, message", CHOICES, ids=[str(c[0]) for c in CHOICES])
def test_unknown_choice_is_one_line(flat, message):
    assert one_line_error(from_flat, "examples", **flat).startswith(message)


def test_good_values_pass_and_integers_become_numbers():
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert from_flat("examples", device=device).model.device == device  # usable here or not: checked at load
    cfg = from_flat("examples", alpha=8, lr=1, dataset="d.parquet", passages="wikipedia", relations=["capital"])
    assert cfg.training.alpha == 8.0 and type(cfg.training.alpha) is float and type(cfg.training.lr) is float
    tasks = from_flat("tasks", sweep=[0, 1], threshold=1, max_test=3)
    assert tasks.data.sweep == [0.0, 1.0] and all(type(x) is float for x in tasks.data.sweep)
    assert validate(cfg) == cfg and validate(ExampleConfig()) == ExampleConfig()
    assert validate(TaskConfig()) == TaskConfig()


def test_override_names_the_flag_not_the_file():
    cfg = load_config(None, "demo")
    assert one_line_error(override, cfg, trials=0) == "--trials must be at least 1, got 0"
    assert override(cfg, trials=None).merge.trials == cfg.merge.trials  # None = a flag left unset
    assert "is not a setting of a examples run" in one_line_error(override, cfg, pool="bundled")
    assert "nope is not a setting" in one_line_error(override, cfg, nope=1)


def test_a_config_built_in_python_is_named_by_its_field():
    cfg = dataclasses.replace(ExampleConfig(), batch_rows=0)
    assert one_line_error(validate, cfg) == "config: batch_rows must be at least 1, got 0"
    bad = dataclasses.replace(ExampleConfig(), merge=dataclasses.replace(ExampleConfig().merge, partners=-1))
    assert one_line_error(validate, bad, "x.yaml") == "x.yaml: merge.partners must be at least 0, got -1"


# --------------------------------------------------------------------------------------- YAML and presets

YAML = [
    ("trials: 2.5\n", "merge.trials: expected an integer ≥ 1, got 2.5"),  # an earlier version's flat file
    ("kind: examples\nmerge: {trials: 2.5}\n", "merge.trials: expected an integer ≥ 1, got 2.5"),
    ("batch_rows: 0\n", "batch_rows must be at least 1, got 0"),
    ("items: ten\n", "data.items: expected an integer ≥ 1, got 'ten'"),
    ("items: null\n", "data.items: expected an integer ≥ 1, got null"),
    ("items: true\n", "data.items: expected an integer ≥ 1, got true"),
    ("seed: abc\n", "seed: expected an integer in [0, 4294967295], got 'abc'"),
    ("method_params: x\n", "merge.params: expected a mapping of names to values, got 'x'"),
    ("method_params: {density: 5}\n", "merge.params: density must be in (0, 1], got 5"),
    ("method_params: {density: abc}\n", "merge.params: knots: density takes a number, got 'abc'"),
    ("method: soup\n", "merge.method: unknown merge method 'soup'"),
    ("relations: capital\n", "data.relations: expected a non-empty list of non-empty strings, or null, got 'capital'"),
    ("n_options: 1\n", "data.n_options must be at least 2, got 1"),
    ("kind: examples\nmodel: {dtype: f8}\n", "model.dtype: unknown dtype 'f8'"),
    ("kind: examples\nbackend: {name: spark}\n", "backend.name: unknown backend 'spark'"),
    ("kind: examples\nmerge: 5\n", "merge: expected a mapping of keys to values, got 5"),
    ("kind: examples\ndata: {nope: 1}\n", "data: unknown keys nope"),
    ("kind: tasks\ndata: {max_test: 0}\n", "data.max_test must be at least 1, got 0"),
    ("kind: tasks\ndata: {sweep: [0.5, x]}\n", "data.sweep[1]: expected a number in [0, 1], got 'x'"),
]


@pytest.mark.parametrize("text, message", YAML, ids=[c[0].strip() for c in YAML])
def test_yaml_value_is_one_line_naming_file_and_field(tmp_path, text, message):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    kind = "tasks" if "kind: tasks" in text else "examples"
    assert one_line_error(load_config, p, kind=kind).startswith(f"{p}: {message}")


def test_config_path_that_is_a_directory(tmp_path):
    assert "is a directory, not a config file" in one_line_error(load_config, tmp_path)


def test_undecodable_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"items: \xff\xfe\n")
    assert one_line_error(load_config, p).startswith(f"{p}: cannot read the config file")


def test_every_preset_validates_and_round_trips(tmp_path):
    for name in PRESETS:
        cfg = load_config(None, name)
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(tmp_path / f"{name}.yaml") == cfg
    for name in TASK_PRESETS:
        cfg = load_config(None, name, kind="tasks")
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(tmp_path / f"{name}.yaml", kind="tasks") == cfg


# --------------------------------------------------------------------------------------- merge methods

BAD_PARAMS = [
    ("knots", dict(density=5), "density must be in (0, 1], got 5"),
    ("ties", dict(density=0), "density must be in (0, 1], got 0"),
    ("knots", dict(dare=1.0), "dare drop probability must be in [0, 1), got 1"),
    ("ties", dict(lam=0), "lam must be a finite number > 0, got 0"),
    ("task_arithmetic", dict(lam=float("nan")), "lam must be a finite number > 0, got nan"),
    ("knots", dict(rtol=2), "rtol must be in [0, 1), got 2"),
    ("ties", dict(seed=-1), "seed must be in [0, 2^63), got -1"),
    ("knots", dict(inner="soup"), "knots: inner takes 'ties' or 'mean', got 'soup'"),
    ("ties", dict(density="abc"), "ties: density takes a number, got 'abc'"),
    ("ties", dict(per_module="yes"), "ties: per_module takes true or false, got 'yes'"),
    ("ties", dict(seed=1.5), "ties: seed takes an integer, got 1.5"),
    ("knots", dict(seed=True), "knots: seed takes an integer, got True"),
    ("knots", dict(lam=True), "knots: lam takes a number, got True"),
]


@pytest.mark.parametrize("method, params, message", BAD_PARAMS, ids=[f"{c[0]}-{c[1]}" for c in BAD_PARAMS])
def test_method_parameters_are_checked_when_the_method_is_built(method, params, message):
    assert message in one_line_error(get_method, method, **params)


def test_method_parameters_are_typed_on_construction():
    k = get_method("knots", density=1, lam=2, rtol="1e-6")  # YAML 1.1 reads 1e-6 as text
    assert (k.density, k.lam, k.rtol) == (1.0, 2.0, 1e-6) and type(k.density) is float
    assert one_line_error(dataclasses.replace, Knots(), density=2) == "density must be in (0, 1], got 2"


# ------------------------------------------------------------------------------ the command line, end to end


def _cli_rejects(args, capsys, out, message):
    code, _, err = run_cli([*args, "--out", out], capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


CLI = [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--rank", "-3"], "--rank must be at least 1, got -3"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 4294967295]"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--dtype", "f8"], "unknown dtype 'f8'"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--engine", "turbo"], "unknown engine 'turbo'"),
    (["--update", "half"], "unknown update 'half'"),
    (["--backend", "spark"], "unknown backend 'spark'"),
    (["--method", "soup"], "unknown merge method 'soup'"),
]


@pytest.mark.parametrize("opts, message", CLI, ids=[" ".join(c[0]) for c in CLI])
def test_run_popqa_flag_rejected_before_the_run_directory(tiny_model_dir, dataset, tmp_path, capsys, opts, message):
    args = ["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20", "--partners", "2",
            "--layer", "1", *opts]
    _cli_rejects(args, capsys, tmp_path / "run", message)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_run_tasks_max_test_rejected(tiny_model_dir, tmp_path, capsys, value):
    _cli_rejects(["run", "tasks", "--model", tiny_model_dir, "--max-test", value], capsys, tmp_path / "run",
                 f"--max-test must be at least 1, got {value}")


@pytest.mark.parametrize("text, message", [
    ("trials: 2.5\n", "merge.trials: expected an integer ≥ 1, got 2.5"),
    ("batch_rows: 0\n", "batch_rows must be at least 1, got 0"),
    ("method_params: {density: 5}\n", "merge.params: density must be in (0, 1], got 5"),
    ("relations: capital\n", "data.relations: expected a non-empty list"),
])
def test_run_popqa_config_file_rejected(tiny_model_dir, dataset, tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    args = ["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--config", cfg]
    _cli_rejects(args, capsys, tmp_path / "run", f"{cfg}: {message}")


def test_run_popqa_config_directory_rejected(tmp_path, capsys):
    _cli_rejects(["run", "popqa", "--config", tmp_path], capsys, tmp_path / "run", "is a directory")


# ------------------------------------------------------------------------- the prepare step: data and model


def write_facts(path, facts, *, passage=True, extra_lines=()):
    rows = [dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop, question=f.question,
                 possible_answers=json.dumps(list(f.possible_answers)), **({"passage": f.passage} if passage else {}))
            for f in facts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def rejected_run(cfg, out) -> str:
    msg = one_line_error(run_examples, cfg, out, console=QUIET)
    assert not out.exists()
    return msg


def test_python_built_config_is_checked_by_the_run(tiny_model_dir, dataset, tmp_path):
    cfg = dataclasses.replace(cfg_for(tiny_model_dir, dataset), batch_rows=0)  # replace checks nothing
    assert rejected_run(cfg, tmp_path / "run") == "config: batch_rows must be at least 1, got 0"
    m = dataclasses.replace(cfg.merge, params={"density": 5})
    cfg = dataclasses.replace(cfg_for(tiny_model_dir, dataset), merge=m)
    assert rejected_run(cfg, tmp_path / "run") == "config: merge.params: density must be in (0, 1], got 5"
    tcfg = dataclasses.replace(TaskConfig(), data=dataclasses.replace(TaskConfig().data, max_test=-1))
    assert one_line_error(run_tasks, tcfg, tmp_path / "t", console=QUIET) == (
        "config: data.max_test must be at least 1, got -1")
    assert not (tmp_path / "t").exists()


def test_popqa_file_without_passages(tiny_model_dir, tmp_path):
    data = write_facts(tmp_path / "facts.jsonl", word_facts(), passage=False)
    msg = rejected_run(cfg_for(tiny_model_dir, data), tmp_path / "run")
    assert "20 of 20 facts have no training passage" in msg and "--passages" in msg


def test_jsonl_row_that_is_a_bare_number(tiny_model_dir, tmp_path):
    data = write_facts(tmp_path / "facts.jsonl", word_facts(), extra_lines=["42\n"])
    msg = rejected_run(cfg_for(tiny_model_dir, data), tmp_path / "run")
    assert msg == f"{data}, row 21: expected a JSON object of columns, got int '42'"


def test_passages_file_row_that_is_a_bare_number(tiny_model_dir, dataset, tmp_path):
    passages = tmp_path / "p.jsonl"
    passages.write_text(json.dumps({"subj": "w0", "passage": "w0 w1 w2"}) + "\n7\n")
    msg = rejected_run(cfg_for(tiny_model_dir, dataset, passages=str(passages)), tmp_path / "run")
    assert msg == f"{passages}, row 2: expected a JSON object of columns, got int '7'"


def test_dataset_file_that_is_a_directory_or_repeats_an_id(tiny_model_dir, tmp_path):
    folder = tmp_path / "facts.jsonl"
    folder.mkdir()
    assert "is a directory, not a dataset file" in rejected_run(cfg_for(tiny_model_dir, folder), tmp_path / "run")
    facts = word_facts()
    data = write_facts(tmp_path / "dup.jsonl", [*facts, dataclasses.replace(facts[3], subj="w99")])
    assert "row 21: id 'f3' repeats row 4" in rejected_run(cfg_for(tiny_model_dir, data), tmp_path / "run")


def test_undecodable_dataset_file(tiny_model_dir, tmp_path):
    data = tmp_path / "facts.tsv"
    data.write_bytes(b"id\tsubj\n\xff\xfe\n")
    assert rejected_run(cfg_for(tiny_model_dir, data), tmp_path / "run").startswith(f"{data}: cannot read the file (")


def test_more_options_than_a_relation_can_supply(tiny_model_dir, dataset, tmp_path):
    msg = rejected_run(cfg_for(tiny_model_dir, dataset, n_options=12), tmp_path / "run")
    assert "distinct answers, 12 options are needed" in msg


def test_passage_without_a_trainable_line(tiny_model_dir, tmp_path):
    facts = word_facts()
    facts[5] = dataclasses.replace(facts[5], passage="w5\n\n")  # one token: nothing to predict
    data = write_facts(tmp_path / "facts.jsonl", facts)
    msg = rejected_run(cfg_for(tiny_model_dir, data), tmp_path / "run")
    assert msg == ("item f5: its passage has no line of two or more tokens to train on: give subject 'w5' a longer "
                   "passage")


def test_model_directory_without_a_tokenizer(tiny_model_dir, dataset, tmp_path):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, bare / f.name)
    msg = rejected_run(cfg_for(bare, dataset), tmp_path / "run")
    assert msg.startswith(f"model directory {bare} has no tokenizer") and "save_pretrained" in msg
