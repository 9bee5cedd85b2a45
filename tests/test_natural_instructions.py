"""The `natural-instructions` pool: NI v1's tasks from the bigbench sdist, converted to the Lots-of-LoRAs layout.

The tasks come from tests/fixtures/natural_instructions/, the sdist's folder in miniature: three real subtasks with
a handful of their real instances each (task036 also holds the real data's one instance with an empty target,
which sits in subtask044). Folder extraction runs against a tiny tar.gz built here, served by `responses`.
"""

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import responses
from rich.console import Console

from mergeability import fetch
from mergeability.data import bigbench
from mergeability.data import natural_instructions as ni
from mergeability.data import tasks as tasks_module
from mergeability.data.pools import load_pool
from mergeability.data.tasks import Example, SplitFiles
from mergeability.errors import MergeabilityError
from mergeability.exact_match import exact_match

FIXTURE = Path(__file__).parent / "fixtures" / "natural_instructions"
NAMES = ["task036_qasc_topic_word_to_generate_related_fact", "task047_miscellaneous_answering_science_questions",
         "task050_multirc_answerability"]
QUIET = Console(file=io.StringIO())


@pytest.fixture
def fixture_source(tmp_path, monkeypatch):
    """The pool converted from the fixture into a test cache; the calls that fetched the source are counted."""
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    calls = []

    def folder(path_inside, console=None):
        calls.append(path_inside)
        return FIXTURE

    monkeypatch.setattr(ni, "bigbench_folder", folder)
    return calls


def _source(task: str) -> dict:
    return json.loads((FIXTURE / task / "task.json").read_text())


def _by_id(tasks) -> dict:
    return {e.id: (t.name, s, e) for t in tasks for s, rows in t.splits.items() for e in rows}


# ---------------------------------------------------------------------------------------------- names and prompts


def test_names_are_lots_of_loras_names():
    assert ni.task_name("subtask001_quoref_question_generation") == "task001_quoref_question_generation"
    assert ni.task_name("subtask061_ropes_answer_generation") == "task061_ropes_answer_generation"
    # the two that Super-NaturalInstructions (and so Lots-of-LoRAs) renamed
    assert ni.task_name("subtask046_miscellaenous_question_typing") == "task046_miscellaneous_question_typing"
    assert ni.task_name("subtask047_misc_answering_science_questions") == \
        "task047_miscellaneous_answering_science_questions"
    with pytest.raises(MergeabilityError, match="not an NI v1 subtask name"):
        ni.task_name("task.json")


def test_the_definition_line_follows_the_collator_rules():
    assert ni.instruction("Definition: Answer  it.\n\n\n Prompt: Go") == "Definition: Answer it. Prompt: Go."
    assert ni.instruction("Definition: Is it? ") == "Definition: Is it?"  # punctuation already: no period added
    assert ni.instruction("Label the pair") == "Definition: Label the pair."


def test_pool_has_the_names_and_prompts_of_lots_of_loras(fixture_source):
    tasks = load_pool("natural-instructions")
    assert [t.name for t in tasks] == NAMES and fixture_source == [bigbench.NATURAL_INSTRUCTIONS]
    _, _, e = _by_id(tasks)["task050_multirc_answerability-10"]
    assert e.input == (
        'Definition: You are given a sentence and a question in the input. If information provided in the sentence '
        'is enough to answer the question, label "Yes", otherwise label "No". Things to Avoid: Do not use any facts '
        'other than those provided in the sentence while labelling "Yes" or "No" . Emphasis/Caution: There are only '
        '2 types of valid responses: Yes and No. Prompt: Can the above question be answered using only the '
        'information provided in the given sentence?\n\n'
        'Now complete the following example -\nInput: Sentence: They swam. \nQuestion: Why was Square sad?\nOutput:')
    assert e.outputs == ("No.",)
    for t in tasks:  # one definition per task, the instance last
        heads = {e.input.split("\n\nNow complete the following example -\nInput: ")[0]
                 for rows in t.splits.values() for e in rows}
        assert len(heads) == 1 and heads.pop().startswith("Definition: ")


def test_every_accepted_output_is_a_reference(fixture_source):
    rows = _by_id(load_pool("natural-instructions"))
    source = _source("subtask036_qasc_topic_word_to_generate_related_fact")["examples"]
    _, _, rain = rows["task036_qasc_topic_word_to_generate_related_fact-9"]
    assert rain.outputs == tuple(source[9]["target"]) and len(rain.outputs) == 9
    for answer in ("erosion rain", "la", "What is erosion."):  # any reference scores, as normalised
        assert exact_match(answer, rain.outputs)
    assert not exact_match("erosion rain precipitation wind", rain.outputs)
    assert "task036_qasc_topic_word_to_generate_related_fact-4" not in rows  # its only target is empty: dropped


# ---------------------------------------------------------------------------------------------- splits


def test_splits_are_80_10_10_and_cover_every_usable_instance_once(fixture_source):
    tasks = load_pool("natural-instructions")
    sizes = {t.name: {s: len(r) for s, r in t.splits.items()} for t in tasks}
    assert sizes == {NAMES[0]: {"train": 8, "valid": 1, "test": 1}, NAMES[1]: {"train": 8, "valid": 1, "test": 1},
                     NAMES[2]: {"train": 16, "valid": 2, "test": 2}}
    ids = [e.id for t in tasks for rows in t.splits.values() for e in rows]
    assert len(ids) == len(set(ids)) == 10 + 10 + 20
    assert ni.split_sizes(58, "t") == {"train": 46, "valid": 6, "test": 6}  # the smallest real task
    assert ni.split_sizes(6500, "t") == {"train": 5200, "valid": 650, "test": 650}


def test_splits_depend_on_the_task_name_not_on_order_or_company(fixture_source, tmp_path):
    full = {i: (n, s) for i, (n, s, _) in _by_id(load_pool("natural-instructions")).items()}
    alone = tmp_path / "alone"
    shutil.copytree(FIXTURE / "subtask050_multirc_answerability", alone / "subtask050_multirc_answerability")
    ni.convert(alone, tmp_path / "pool")
    from mergeability.data.tasks import load_local_pool

    only = {i: (n, s) for i, (n, s, _) in _by_id(load_local_pool(tmp_path / "pool")).items()}
    assert only == {i: v for i, v in full.items() if v[0] == NAMES[2]}  # converted alone: the same split
    rows = list(range(100))
    assert ni.split_rows("task001_a", rows) == ni.split_rows("task001_a", rows)
    assert ni.split_rows("task001_a", rows)["test"] != ni.split_rows("task002_b", rows)["test"]


def test_tasks_are_selected_by_name_or_number(fixture_source):
    assert [t.name for t in load_pool("natural-instructions", ["47", NAMES[2]])] == NAMES[1:]
    with pytest.raises(MergeabilityError, match="no task '12' in the pool"):
        load_pool("natural-instructions", ["12"])


# ---------------------------------------------------------------------------------------------- lean loading


def _whole_file(path: Path) -> list[Example]:
    """A split as the loader read it before it was lean: every line of the file, in order."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(r["id"], r["input"], tuple(r["output"])) for r in rows]


def test_the_lean_pool_yields_exactly_the_examples_of_the_whole_files(fixture_source):
    tasks = load_pool("natural-instructions")
    root = ni.pool_dir(QUIET)
    assert all(isinstance(t.splits, SplitFiles) for t in tasks)  # paths only, until a split is used
    for t in tasks:
        for split in ("train", "valid", "test"):
            whole = _whole_file(root / "datasets" / t.name / f"{split}.jsonl")
            assert t.splits[split] == t.split(split) == whole  # same examples, same order
            for limit in (1, 3, len(whole), len(whole) + 5):  # a capped read is the whole file's first rows
                assert t.split(split, limit) == whole[:limit]


def test_loading_the_pool_reads_no_split_file_and_a_capped_read_stops_early(fixture_source, monkeypatch):
    read = []
    real = tasks_module.read_split
    monkeypatch.setattr(tasks_module, "read_split", lambda path, limit=None: read.append(path) or real(path, limit))
    task = load_pool("natural-instructions", ["50"])[0]
    assert read == []  # 40 rows in 9 files, none read to load the pool
    train = ni.pool_dir(QUIET) / "datasets" / NAMES[2] / "train.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]), encoding="utf-8")
    assert [e.id for e in task.split("train", 2)] == [json.loads(line)["id"] for line in lines[:2]]
    with pytest.raises(MergeabilityError, match=r"train.jsonl, row 3: invalid JSON"):
        task.split("train")  # the whole split reaches the bad row: the capped read above never did
    assert "train" in task.splits and "other" not in task.splits and len(read) == 2  # membership reads nothing


# ---------------------------------------------------------------------------------------------- the cache


def test_the_converted_pool_is_cached_and_rebuilt_when_damaged(fixture_source):
    root = ni.pool_dir(QUIET)
    assert len(fixture_source) == 1 and ni.intact(root)
    assert ni.pool_dir(QUIET) == root and len(fixture_source) == 1  # the second use converts nothing
    test = root / "datasets" / NAMES[2] / "test.jsonl"
    good = test.read_bytes()
    test.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    assert not ni.intact(root)
    assert ni.pool_dir(QUIET) == root and len(fixture_source) == 2 and test.read_bytes() == good
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written left beside it


def test_a_conversion_that_fails_leaves_no_pool(fixture_source, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURE, bad)
    (bad / "subtask050_multirc_answerability" / "task.json").write_text("{")
    monkeypatch.setattr(ni, "bigbench_folder", lambda path_inside, console=None: bad)
    with pytest.raises(MergeabilityError, match="not a BIG-bench task.json"):
        ni.pool_dir(QUIET)
    assert not list((tmp_path / "cache").glob("natural-instructions*"))


@pytest.mark.parametrize("content, problem", [
    ("not json", "not a BIG-bench task.json with 'task_prefix' and 'examples'"),
    ({"task_prefix": "", "examples": []}, "'task_prefix' must be a non-empty string"),
    ({"task_prefix": "Definition: x", "examples": [{"input": 3, "target": ["a"]}]}, "example 1: needs a string"),
    ({"task_prefix": "Definition: x", "examples": [{"input": "q", "target": 3}]}, "example 1: needs a string"),
    ({"task_prefix": "Definition: x", "examples": [{"input": "q", "target": ["a"]}] * 2}, "needs at least 3"),
])
def test_malformed_subtasks_are_one_line_errors(tmp_path, content, problem):
    task = tmp_path / "src" / "subtask001_x" / "task.json"
    task.parent.mkdir(parents=True)
    task.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(MergeabilityError, match=problem) as e:
        ni.convert(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(e.value)


def test_a_folder_without_subtasks_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(MergeabilityError, match="no subtask.* folders: not a Natural Instructions folder"):
        ni.convert(tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------------------------------------- the folder fetch

INDEX = "https://index.test/simple"
URL = "https://files.test/packages/bigbench-1.0.0.tar.gz"
INSIDE = "bigbench-1.0.0/" + bigbench.NATURAL_INSTRUCTIONS


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    """A tiny bigbench sdist holding the fixture folder, a sibling folder, and a member whose name climbs out;
    the archive description pinning the folder's digest; the cache and index moved to test places."""
    files = {p.relative_to(FIXTURE).as_posix(): p.read_bytes() for p in sorted(FIXTURE.rglob("*")) if p.is_file()}
    data = _tar({"bigbench-1.0.0/PKG-INFO": b"Name: bigbench\n",
                 **{f"{INSIDE}/{rel}": b for rel, b in files.items()},
                 f"{INSIDE}_other/task.json": b"{}", f"{INSIDE}/../../../escaped.json": b"{}"})
    archive = bigbench.Archive("bigbench", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0",
                               {bigbench.NATURAL_INSTRUCTIONS: bigbench.tree_sha256(FIXTURE)})
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "INDEX", INDEX)
    return archive, data


def _serve(rs, data: bytes) -> None:
    files = [{"filename": "bigbench-1.0.0.tar.gz", "url": URL, "size": len(data),
              "hashes": {"sha256": hashlib.sha256(data).hexdigest()}}]
    rs.add(responses.GET, f"{INDEX}/bigbench/", json={"files": files})
    rs.add(responses.GET, URL, body=data)


def test_the_folder_alone_is_extracted_checked_and_cached(sdist, tmp_path):
    archive, data = sdist
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        path = bigbench.folder(archive, bigbench.NATURAL_INSTRUCTIONS, QUIET)
    cache = tmp_path / "cache"
    assert path == cache / INSIDE and bigbench.tree_sha256(path) == bigbench.tree_sha256(FIXTURE)
    extracted = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    assert extracted == sorted(["downloads/bigbench-1.0.0.tar.gz",
                                *(f"{INSIDE}/{p.relative_to(FIXTURE).as_posix()}" for p in FIXTURE.rglob("*.json"))])
    with responses.RequestsMock():  # cached and intact: no request at all
        assert bigbench.folder(archive, bigbench.NATURAL_INSTRUCTIONS, QUIET) == path


def test_a_damaged_cached_folder_is_extracted_again_from_the_kept_sdist(sdist):
    archive, data = sdist
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        path = bigbench.folder(archive, bigbench.NATURAL_INSTRUCTIONS, QUIET)
        (path / "subtask050_multirc_answerability" / "task.json").write_text("{}")  # edited by hand
        (path / "stray.txt").write_text("x")
        assert bigbench.tree_sha256(bigbench.folder(archive, bigbench.NATURAL_INSTRUCTIONS, QUIET)) == \
            bigbench.tree_sha256(FIXTURE)
        assert len([c for c in rs.calls if c.request.url == URL]) == 1  # not downloaded again


def test_a_folder_that_fails_its_digest_is_not_kept(sdist, tmp_path):
    archive, data = sdist
    wrong = bigbench.Archive(archive.package, archive.filename, archive.root,
                             {bigbench.NATURAL_INSTRUCTIONS: "0" * 64})
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        with pytest.raises(MergeabilityError, match="has digest .* not the pinned 000000000000") as e:
            bigbench.folder(wrong, bigbench.NATURAL_INSTRUCTIONS, QUIET)
        with pytest.raises(MergeabilityError, match="has no folder bigbench-1.0.0/bigbench/missing"):
            bigbench.folder(archive, "bigbench/missing", QUIET)
    assert "\n" not in str(e.value) and not (tmp_path / "cache" / INSIDE).exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]
