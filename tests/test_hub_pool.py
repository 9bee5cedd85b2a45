"""The Lots-of-LoRAs hub pool with the hub replaced by local files (no network): datasets without an adapter are
skipped with one note unless --train-missing trains them, a whole-organisation listing needs --tasks or
--max-tasks (an error before anything is fetched or written otherwise), and --max-tasks takes the first tasks by
number."""

import json
import sys
import types

import pytest
import torch
from rich.console import Console

from conftest import TARGETS, random_update, run_cli, task_cfg_for, write_rows
from mergeability import MergeabilityError
from mergeability.data.pools import load_pool
from mergeability.updates import save_update

ORG = "Lots-of-LoRAs"
ADAPTER = "Mistral-7B-Instruct-v0.2-4b-r16-task{}"
# Numbers chosen so that name order (task10 < task1391 < task2 < …) and number order differ; 2 and 4 have no adapter.
DATASETS = {"task001_alpha": True, "task2_beta": False, "task10_gamma": True, "task3_delta": True,
            "task1391_eps": True, "task4_zeta": False}


class FakeHub:
    """The organisation as the hub would list it, and a record of what was listed and downloaded."""

    def __init__(self, root, adapter_dirs):
        self.root, self.adapter_dirs = root, adapter_dirs
        self.listed, self.downloaded, self.loaded = [], [], []

    def install(self, monkeypatch):
        import huggingface_hub

        ids = lambda names: [types.SimpleNamespace(id=f"{ORG}/{n}") for n in names]  # noqa: E731

        def list_models(api, author):
            self.listed.append("models")
            return ids([ADAPTER.format(int(n.split("_")[0][4:])) for n, has in DATASETS.items() if has] + ["other"])

        def list_datasets(api, author):
            self.listed.append("datasets")
            return ids([*DATASETS, "README"])

        def snapshot_download(repo):
            self.downloaded.append(repo.split("/", 1)[1])
            return str(self.adapter_dirs[repo.split("/", 1)[1]])

        def load_dataset(name):
            self.loaded.append(name.split("/", 1)[1])
            local = self.root / name.split("/", 1)[1]
            return {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in local.glob("*.jsonl")}

        monkeypatch.setattr(huggingface_hub.HfApi, "list_models", list_models)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_datasets", list_datasets)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
        return self


def hub_files(root, model_dir=None):
    """Each dataset's train/test rows (the tiny tokenizer's words), and an adapter for each one that has one:
    fitted to the tiny model when `model_dir` is given."""
    shapes = {f"model.layers.{i}.self_attn.{m}": (32 if m == "q_proj" else 16, 32) for i in range(2)
              for m in ("q_proj", "k_proj", "v_proj")}
    adapters = {}
    for k, (name, has) in enumerate(DATASETS.items()):
        rows = [{"id": f"{k}-{i}", "input": f"w{k} w{(3 * i + k) % 50} w{(5 * i) % 40 + 50} w99",
                 "output": [f"w{110 + k}"]} for i in range(16)]
        write_rows(root / "datasets" / name / "train.jsonl", rows[:8])
        write_rows(root / "datasets" / name / "test.jsonl", rows[8:])
        if has:
            number = int(name.split("_")[0][4:])
            path = root / "adapters" / ADAPTER.format(number)
            upd = random_update(shapes, 2, seed=k, base=str(model_dir or "tiny"), dtype=torch.float32)
            save_update(upd, path)
            adapters[ADAPTER.format(number)] = path
    return adapters


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hub" / "datasets", hub_files(tmp_path / "hub")).install(monkeypatch)


def test_datasets_without_an_adapter_are_skipped_with_one_note(hub):
    notes = []
    tasks = load_pool("hub", ["1", "2", "3", "4"], note=notes.append)
    assert [t.name for t in tasks] == ["task001_alpha", "task3_delta"]
    assert all(t.adapter is not None for t in tasks)
    assert notes == [f"skipped 2 {ORG} datasets with no adapter in the collection (pass --train-missing to train "
                     "them): task2_beta, task4_zeta"]
    assert sorted(hub.loaded) == ["task001_alpha", "task3_delta"]  # the skipped ones are not even downloaded


def test_train_missing_keeps_them_for_the_run_to_train(hub):
    notes = []
    tasks = load_pool("hub", ["1", "2", "3", "4"], train_missing=True, note=notes.append)
    assert [(t.name, t.adapter is None) for t in tasks] == [("task001_alpha", False), ("task2_beta", True),
                                                           ("task3_delta", False), ("task4_zeta", True)]
    assert notes == [] and len(tasks[1].split("train")) == 8


def test_max_tasks_takes_the_first_by_number(hub):
    notes = []
    assert [t.name for t in load_pool("hub", max_tasks=3, note=notes.append)] == [
        "task001_alpha", "task3_delta", "task10_gamma"]  # 2 and 4 skipped: they do not use up the cap
    assert notes == [f"skipped 2 {ORG} datasets with no adapter in the collection (pass --train-missing to train "
                     "them): task2_beta, task4_zeta"]
    assert hub.downloaded == [ADAPTER.format(n) for n in (1, 3, 10)]  # task1391 is neither loaded nor fetched
    assert [t.name for t in load_pool("hub", max_tasks=3, train_missing=True)] == [
        "task001_alpha", "task2_beta", "task3_delta"]
    with pytest.raises(MergeabilityError, match="none of the 1 Lots-of-LoRAs datasets selected has an adapter: "
                                                "pass --train-missing"):
        load_pool("hub", ["2"], note=notes.append)


def test_listing_the_whole_organisation_is_refused_before_anything_is_fetched(hub, tmp_path, capsys):
    with pytest.raises(MergeabilityError, match="--tasks .* --max-tasks"):
        load_pool("hub")
    out = tmp_path / "run"
    for args in ([], ["--preset", "lots-of-loras"]):
        code, _, err = run_cli(["run", "tasks", "--pool", "hub", "--out", out, *args], capsys)
        assert code == 2 and err.startswith("error: --pool hub would load every Lots-of-LoRAs dataset") \
            and "--tasks" in err and "--max-tasks N" in err and err.count("\n") == 1, err
        assert not out.exists()
    assert hub.listed == [] and hub.downloaded == [] and hub.loaded == []


def test_lots_of_loras_preset_evaluates_every_test_item():
    from mergeability.config import load_config

    cfg = load_config(None, "lots-of-loras", kind="tasks")
    assert cfg.data.pool == "hub" and cfg.data.max_test is None
    assert cfg.data.max_tasks is None and cfg.data.train_missing is False  # the tasks are the run's choice


@pytest.fixture
def tiny_hub(tmp_path, monkeypatch, tiny_model_dir):
    return FakeHub(tmp_path / "hub" / "datasets", hub_files(tmp_path / "hub", tiny_model_dir)).install(monkeypatch)


def test_a_hub_run_skips_or_trains_the_adapterless_datasets(tiny_hub, tiny_model_dir, tmp_path):
    from mergeability.pipelines import run_tasks
    from mergeability.store import Store

    text = []
    for train_missing in (False, True):
        console = Console(file=_Lines(text), width=300)
        out = tmp_path / f"run-{train_missing}"
        cfg = task_cfg_for(tiny_model_dir, "hub", tasks=["1", "2", "3"], train_missing=train_missing, trials=1,
                           partners=1, targets=TARGETS)
        run_tasks(cfg, out, console=console)
        store = Store(out / "results.sqlite", lock=False)
        rows = {r["name"]: r for r in store.task_rows()}
        prov = store.get_meta("provenance")
        store.close()
        if not train_missing:
            assert sorted(rows) == ["task001_alpha", "task3_delta"]
            assert sum("skipped 1 Lots-of-LoRAs dataset with no adapter" in line for line in text) == 1
            assert "task2_beta" in prov["pool notes"]
        else:
            assert sorted(rows) == ["task001_alpha", "task2_beta", "task3_delta"]
            assert rows["task2_beta"]["path"] == "updates/task2_beta" and rows["task2_beta"]["train_loss"] > 0
            assert rows["task001_alpha"]["path"].endswith(ADAPTER.format(1)) and rows["task001_alpha"]["train_loss"] \
                is None
            assert "pool notes" not in prov


class _Lines:
    """A file that keeps what a Console writes, line by line."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, s):
        self.lines.extend(s.splitlines())

    def flush(self):
        pass


def test_max_tasks_caps_every_pool_by_task_number(tmp_path):
    from mergeability.config import from_flat

    root = tmp_path / "pool"
    for name in ("task10_a", "task2_b", "task003_c"):
        write_rows(root / "datasets" / name / "test.jsonl", [{"input": "w1", "output": "w2"}])
    assert [t.name for t in load_pool(str(root), max_tasks=2)] == ["task2_b", "task003_c"]
    assert [t.name for t in load_pool(str(root), ["10", "3"], max_tasks=1)] == ["task003_c"]
    assert [t.name for t in load_pool("bundled", max_tasks=2)] == ["task001_copy_word", "task002_first_letter"]
    with pytest.raises(MergeabilityError, match="--max-tasks must be at least 1, got 0"):
        from_flat("tasks", max_tasks=0)


def test_the_flags_reach_the_run(tiny_hub, tiny_model_dir, tmp_path, capsys):
    from mergeability.store import Store

    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "tasks", "--pool", "hub", "--max-tasks", "3", "--train-missing", "--model",
                                 tiny_model_dir, "--threshold", "0", "--partners", "1", "--trials", "1", "--rank", "2",
                                 "--out", out], capsys)
    assert code == 0, err
    store = Store(out / "results.sqlite", lock=False, read_only=True)
    assert [(r["name"], r["train_loss"] is not None) for r in store.task_rows()] == [
        ("task001_alpha", False), ("task2_beta", True), ("task3_delta", False)]
    store.close()
    assert "no adapter" not in stdout + err  # --train-missing: nothing skipped, so no note
    assert "sweep threshold 0.75 skipped: 0 tasks reach it, N = 1 partners need 2" in stdout
