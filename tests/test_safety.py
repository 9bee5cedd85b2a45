"""Never destroy what is not ours: `--force` replaces only an adapter this tool wrote, run commands refuse a
directory that is not their run, readers never write, bad adapters and paths are one-line errors, and a failed
or interrupted save leaves nothing behind. Each refusal is checked against a snapshot of the whole tree."""

import json
import os
import shutil
import stat

import pytest
import torch

import mergeability.run as run
from conftest import cfg_for, random_update, run_cli
from mergeability import MergeabilityError, load_update
from mergeability.atomic import atomic_dir, atomic_file, default_mode, write_json
from mergeability.config import load_config
from mergeability.store import Store
from mergeability.updates import save_update

MOD = "model.layers.0.mlp.up_proj"
ROOT = os.geteuid() == 0  # root writes through read-only permissions: those cases patch the check instead


def snapshot(root):
    """Every path under `root` with its bytes (files) and mode: what a refused command must leave as it was."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), data)
    return out


def refused(args, capsys, root, match):
    """Run the CLI; it must print one `error:` line naming `match`, exit 2 and leave `root` byte-identical."""
    before = snapshot(root)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert "\x1b" not in err and "Traceback" not in err
    assert snapshot(root) == before
    return err


@pytest.fixture
def adapters(tmp_path):
    return [save_update(random_update({MOD: (16, 8)}, 2, seed=i, dtype=torch.float32, base="tiny"), tmp_path / f"a{i}")
            for i in range(3)]


@pytest.fixture
def no_prepare(monkeypatch):
    """A command that should be refused must not get as far as preparing a run (loading a model, the bundled
    one by default): a regression then fails at once instead of running a demo."""
    import mergeability.pipelines.examples as examples
    import mergeability.pipelines.tasks as tasks

    def went_past_the_checks(cfg):
        raise AssertionError("the command went on to prepare a run in a directory it must refuse")

    monkeypatch.setattr(examples, "prepare_examples", went_past_the_checks)
    monkeypatch.setattr(tasks, "prepare_tasks", went_past_the_checks)


# ------------------------------------------------------------------------------ merge --force and --out


def test_force_refuses_a_user_directory(adapters, tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    refused(["merge", *adapters[:2], "--out", user, "--force"], capsys, tmp_path, "not an adapter this tool wrote")


def test_force_refuses_an_input_adapter_even_one_it_merged(adapters, tmp_path, capsys):
    refused(["merge", *adapters[:2], "--out", adapters[0], "--force"], capsys, tmp_path, "one of the adapters")
    code, _, err = run_cli(["merge", *adapters[:2], "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    refused(["merge", tmp_path / "m", adapters[2], "--out", tmp_path / "m", "--force"], capsys, tmp_path,
            "one of the adapters")


def test_force_refuses_a_file_and_leaves_no_old_copy(adapters, tmp_path, capsys):
    (tmp_path / "f.txt").write_text("data")
    refused(["merge", *adapters[:2], "--out", tmp_path / "f.txt", "--force"], capsys, tmp_path, "is a file")


def test_force_refuses_our_adapter_with_a_file_added(adapters, tmp_path, capsys):
    assert run_cli(["merge", *adapters[:2], "--out", tmp_path / "m"], capsys)[0] == 0
    (tmp_path / "m" / "README").write_text("my notes")
    refused(["merge", *adapters[:2], "--out", tmp_path / "m", "--force"], capsys, tmp_path, "it holds README")


def test_force_replaces_an_adapter_this_tool_wrote(adapters, tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli(["merge", *adapters[:2], "--method", "mean", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["merge", *adapters[1:], "--method", "mean", "--out", out, "--force"], capsys)
    assert code == 0, err
    assert load_update(out).meta["merge"]["sources"] == [str(a) for a in adapters[1:]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a0", "a1", "a2", "m"]  # no old copy, no temporary


def test_a_plain_saved_update_is_ours_too(tmp_path):
    """Updates saved with no provenance to record still get the file: it is what marks a directory as ours."""
    u = random_update({MOD: (16, 8)}, 2, dtype=torch.float32)
    save_update(u, tmp_path / "u")
    assert json.loads((tmp_path / "u" / "mergeability.json").read_text()) == {}
    save_update(u, tmp_path / "u", force=True)
    (tmp_path / "u" / "mergeability.json").unlink()  # a bare PEFT adapter: not ours to replace
    with pytest.raises(MergeabilityError, match="no mergeability.json"):
        save_update(u, tmp_path / "u", force=True)


@pytest.mark.parametrize("where", ["dot", "parent", "under a file"])
def test_out_paths_that_cannot_be_ours(adapters, tmp_path, capsys, monkeypatch, where):
    (tmp_path / "f.txt").write_text("data")
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    out, match = {"dot": (".", "current directory"), "parent": ("..", "current directory"),
                  "under a file": (tmp_path / "f.txt" / "m", "is a file, not a directory")}[where]
    refused(["merge", *adapters[:2], "--out", out, "--force"], capsys, tmp_path, match)


def read_only(path, monkeypatch):
    """Make `path` read-only; as root (who writes anyway) make the permission check see what a user would."""
    if ROOT:
        monkeypatch.setattr(os, "access", lambda p, mode: not (mode & os.W_OK and str(p).startswith(str(path))))
    else:
        path.chmod(0o555)


@pytest.mark.parametrize("cmd", ["merge", "run"])
def test_out_in_a_read_only_parent(adapters, tmp_path, capsys, monkeypatch, dataset, no_prepare, cmd):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro, monkeypatch)
    args = ["merge", *adapters[:2]] if cmd == "merge" else ["run", "popqa", "--dataset", dataset]
    try:
        refused([*args, "--out", ro / "x" / "m"], capsys, tmp_path, "permission denied")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("case", ["same path", "dot path", "through a link"])
def test_the_same_adapter_twice_is_refused(adapters, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    second = {"same path": "a0", "dot path": "./x/../a0", "through a link": "link"}[case]
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a0")
    refused(["merge", "a0", second, "a1", "--out", "m"], capsys, tmp_path, "given twice")


@pytest.mark.parametrize("opts, match", [
    (["--temperature", "0.5"], "--temperature has no effect"),
    (["--weights", "1,2", "--temperature", "2"], "--temperature has no effect"),
    (["--method", "ties", "--seed", "3"], "--seed only seeds DARE"),
    (["--method", "knots", "--seed", "3", "--param", "dare=null"], "--seed only seeds DARE"),
    (["--method", "task_arithmetic", "--weights", "1e38,1e38"], "overflows"),
    (["--method", "knots", "--weights", "1e38,1e38"], "check --weights"),
    (["--eval", "NOPE", "--eval", "NOPE"], "does not exist"),
    (["--eval", "DIR", "--eval", "DIR"], "is a directory"),
])
def test_options_without_effect_bad_values_and_eval_files(adapters, tmp_path, capsys, opts, match):
    opts = [str(tmp_path / "nope.jsonl") if o == "NOPE" else str(tmp_path / "a2") if o == "DIR" else o for o in opts]
    refused(["merge", *adapters[:2], "--out", tmp_path / "m", *opts], capsys, tmp_path, match)


def test_options_that_do_have_an_effect_still_work(adapters, tmp_path, capsys):
    code, _, err = run_cli(["merge", *adapters[:2], "--method", "ties", "--dare", "0.5", "--seed", "3",
                            "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", *adapters[:2], "--method", "ties", "--param", "dare=0.5", "--seed", "3",
                            "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", *adapters[:2], "--base-accuracy", "0.2,0.8", "--temperature", "0.5",
                            "--out", tmp_path / "t"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------ adapter parsing


def _cfg(**kw):
    return lambda d: _edit_json(d / "adapter_config.json", kw)


def _edit_json(path, kw):
    data = json.loads(path.read_text())
    data.update(kw)
    path.write_text(json.dumps(data))


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _config_dir(d):
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()


def _bin(obj):
    def make(d):
        (d / "adapter_model.safetensors").unlink()
        torch.save(obj, d / "adapter_model.bin")
    return make


class Payload:
    """A pickle that would run code when loaded: a safe load refuses it."""

    def __reduce__(self):
        return (os.getcwd, ())


A_KEY, B_KEY = f"base_model.model.{MOD}.lora_A.weight", f"base_model.model.{MOD}.lora_B.weight"
BAD_ADAPTERS = {
    "lora_alpha text": (_cfg(lora_alpha="16"), "lora_alpha must be a finite number, got '16'"),
    "lora_alpha null": (_cfg(lora_alpha=None), "lora_alpha must be a finite number, got None"),
    "lora_alpha overflowing float32": (_cfg(lora_alpha=1e39), "makes ΔW overflow float32"),
    "r text": (_cfg(r="2"), "r must be a positive integer, got '2'"),
    "r zero": (_cfg(r=0), "r must be a positive integer, got 0"),
    "rank_pattern a list": (_cfg(rank_pattern=[2]), "rank_pattern must be an object"),
    "rank_pattern value text": (_cfg(rank_pattern={"up_proj": "2"}), "rank_pattern['up_proj'] must be"),
    "alpha_pattern bad key": (_cfg(alpha_pattern={"(": 2}), "not a valid pattern"),
    "target_modules numbers": (_cfg(target_modules=[1, 2]), "target_modules must be a list of module names"),
    "use_rslora text": (_cfg(use_rslora="false"), "use_rslora must be true, false or null"),
    "base model a number": (_cfg(base_model_name_or_path=3), "base_model_name_or_path must be text or null"),
    "config a list": (_write("adapter_config.json", "[1, 2]"), "expected a JSON object, got list"),
    "config a directory": (_config_dir, "cannot read it"),
    "provenance invalid JSON": (_write("mergeability.json", "{nope"), "mergeability.json: invalid JSON"),
    "provenance a list": (_write("mergeability.json", "[1]"), "expected a JSON object, got list"),
    "provenance dense_modules": (_write("mergeability.json", '{"dense_modules": 3}'), "dense_modules must be"),
    "bin holding a list": (_bin([1, 2]), "expected a mapping of tensor names to tensors, got list"),
    "bin holding an int": (_bin(5), "got int"),
    "bin holding int tensors": (_bin({A_KEY: torch.ones(2, 8, dtype=torch.int64),
                                      B_KEY: torch.ones(16, 2, dtype=torch.int64)}), "LoRA factors are floats"),
    "bin with pickled code": (_bin({"x": Payload()}), "refused: it holds pickled objects other than tensors"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_one_line(adapters, tmp_path, capsys, case):
    make, match = BAD_ADAPTERS[case]
    make(adapters[1])
    with pytest.raises(MergeabilityError) as e:
        load_update(adapters[1])
    assert match in str(e.value) and "\n" not in str(e.value) and "\x1b" not in str(e.value)
    refused(["merge", adapters[0], adapters[1], "--out", tmp_path / "m"], capsys, tmp_path, match)


def test_valid_bin_adapter_and_null_patterns_load(adapters):
    from safetensors.torch import load_file

    d = adapters[1]
    want = load_update(d).delta(MOD)
    _bin(load_file(d / "adapter_model.safetensors"))(d)
    _edit_json(d / "adapter_config.json", {"rank_pattern": None, "alpha_pattern": None, "use_rslora": None})
    torch.testing.assert_close(load_update(d).delta(MOD), want)


# ------------------------------------------------------------------------------ atomic writes


def test_an_interrupted_save_leaves_no_parents_behind(tmp_path, monkeypatch):
    import mergeability.updates as updates

    (tmp_path / "keep").mkdir()
    before = snapshot(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(updates, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_update(random_update({MOD: (16, 8)}, 2, dtype=torch.float32), tmp_path / "keep" / "new" / "deeper" / "u")
    assert snapshot(tmp_path) == before


def test_atomic_dir_never_replaces_a_file(tmp_path):
    (tmp_path / "f").write_text("data")
    before = snapshot(tmp_path)
    with pytest.raises(MergeabilityError, match="is a file"):
        with atomic_dir(tmp_path / "f", replace=True) as tmp:
            (tmp / "x").write_text("new")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_and_directories_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        d = save_update(random_update({MOD: (16, 8)}, 2, dtype=torch.float32), tmp_path / "u")
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
        assert default_mode(directory=True) == 0o777 & ~mask
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    for f in [*d.iterdir(), tmp_path / "f.txt"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


# ------------------------------------------------------------------------------ run directories


@pytest.fixture
def runs(tmp_path, tiny_model_dir, dataset):
    """An examples run, a tasks run and a demo run, as `run.create` leaves them (no rows needed to be a run)."""
    made = {}
    for name, cfg in {"examples": cfg_for(tiny_model_dir, dataset),
                      "tasks": load_config(None, "bundled", kind="tasks"),
                      "demo": load_config(None, "demo")}.items():
        run.create(tmp_path / name, cfg).close()
        made[name] = tmp_path / name
    return made


@pytest.mark.parametrize("target, match", [("tasks", "holds a tasks run"), ("examples", "holds another run"),
                                           ("user", "holds no run")])
def test_demo_never_takes_over_another_directory(runs, tmp_path, capsys, no_prepare, target, match):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    refused(["demo", "--out", tmp_path / target], capsys, tmp_path, match)


def test_demo_resumes_its_own_run(runs):
    assert run.check_new(runs["demo"], True, load_config(None, "demo"), same_config=True) == runs["demo"]


def test_a_run_of_another_kind_is_refused_before_anything_changes(runs, tmp_path, tiny_model_dir, dataset):
    from mergeability.pipelines import run_examples

    before = snapshot(tmp_path)
    with pytest.raises(MergeabilityError, match="holds a tasks run"):
        run_examples(cfg_for(tiny_model_dir, dataset), runs["tasks"], resume=True)
    with pytest.raises(MergeabilityError, match="holds a examples run"):
        run.create(runs["examples"], load_config(None, "bundled", kind="tasks"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd", [["run", "popqa"], ["run", "tasks"]])
def test_resume_on_the_other_kind_of_run_is_refused(runs, tmp_path, capsys, no_prepare, cmd):
    other = runs["tasks"] if cmd[1] == "popqa" else runs["examples"]
    refused([*cmd, "--out", other, "--resume"], capsys, tmp_path, "run")


@pytest.mark.parametrize("where, match", [("file", "is a file"), ("under a file", "is a file, not a directory"),
                                          ("user", "holds no run")])
def test_run_out_that_is_not_a_run(tmp_path, capsys, dataset, no_prepare, where, match):
    (tmp_path / "f.txt").write_text("data")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    out = {"file": tmp_path / "f.txt", "under a file": tmp_path / "f.txt" / "run", "user": tmp_path / "user"}[where]
    refused(["run", "popqa", "--dataset", dataset, "--out", out, "--resume"], capsys, tmp_path, match)


@pytest.mark.parametrize("cmd", [["report"], ["experiment", "algorithms"]])
@pytest.mark.parametrize("content", ["empty store", "garbage store", "no config"])
def test_readers_never_touch_a_directory_that_is_not_a_run(tmp_path, capsys, cmd, content):
    d = tmp_path / "d"
    d.mkdir()
    (d / "results.sqlite").write_bytes(b"" if content == "empty store" else b"not sqlite at all" * 10)
    if content != "no config":
        (d / "config.yaml").write_text("kind: examples\n")
    refused([*cmd, d], capsys, tmp_path, "not a run directory")


def test_experiment_of_the_wrong_kind_changes_nothing(runs, tmp_path, capsys):
    refused(["experiment", "weighted", runs["examples"]], capsys, tmp_path, "needs a tasks run")


def test_a_read_only_store_writes_nothing(tmp_path):
    (tmp_path / "results.sqlite").touch()
    with pytest.raises(MergeabilityError, match="not a results store"):
        Store(tmp_path / "results.sqlite", lock=False, read_only=True)
    with pytest.raises(MergeabilityError, match="no results store"):
        Store(tmp_path / "nothing.sqlite", lock=False, read_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]
    assert (tmp_path / "results.sqlite").stat().st_size == 0


def test_a_writer_refuses_a_file_that_is_not_a_store_before_locking(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"not sqlite at all" * 10)
    before = snapshot(tmp_path)
    with pytest.raises(MergeabilityError, match="not a results store"):
        Store(tmp_path / "results.sqlite")
    assert snapshot(tmp_path) == before


def test_report_on_a_read_only_run(runs, tmp_path, capsys, monkeypatch):
    read_only(runs["examples"], monkeypatch)
    try:
        refused(["report", runs["examples"]], capsys, tmp_path, "permission denied")
    finally:
        runs["examples"].chmod(0o755)


def test_reading_a_live_run_is_allowed(runs):
    store = Store(runs["examples"] / "results.sqlite")  # the run's own writer holds the lock
    try:
        cfg, reader = run.open_run(runs["examples"], lock=False)
        assert reader.get_meta("schema_version") == 2 and cfg.kind == "examples"
        reader.close()
    finally:
        store.close()


def test_copies_of_runs_still_open(runs, tmp_path):
    shutil.copytree(runs["tasks"], tmp_path / "copy")
    assert run.run_config(tmp_path / "copy").kind == "tasks"


def _strict(text: str):
    """JSON as a strict reader takes it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_written_json_is_strict(tmp_path):
    import numpy as np

    obj = {"nan": float("nan"), "inf": [1.5, -float("inf")], "np": (np.float32(0.25), np.int64(3), np.float64("nan")),
           "arr": np.array([[1.0, np.nan]]), "ok": [True, None, "x"]}
    write_json(tmp_path / "a.json", obj)
    assert _strict((tmp_path / "a.json").read_text()) == {
        "nan": None, "inf": [1.5, None], "np": [0.25, 3, None], "arr": [[1.0, None]], "ok": [True, None, "x"]}
    assert not [p for p in tmp_path.iterdir() if p.name != "a.json"]  # nothing half-written beside it
