"""The `wikidata` dataset (BIG-bench qa_wikidata as PopQA-schema facts) and its fetch from the bigbench sdist.

The facts come from tests/fixtures/qa_wikidata_task.json, a hand-picked subset of the real task.json with every
prompt form; the fetch runs against a tiny tar.gz built here, served by a mocked HTTP layer (`responses`).
"""

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import requests
import responses
from rich.console import Console

from mergeability import fetch
from mergeability.data import bigbench, build_items, load_facts, wikidata
from mergeability.data.leakage import Taught, audit
from mergeability.data.mc import alias_key
from mergeability.data.sources import answer_pools
from mergeability.data.wikidata_relations import BY_NAME, RELATIONS
from mergeability.errors import MergeabilityError

FIXTURE = Path(__file__).parent / "fixtures" / "qa_wikidata_task.json"
USABLE = ["capital", "capital of", "country"]  # the fixture's relations with 8 distinct answers
POPQA_TEMPLATES = {  # PopQA's own (Mallen et al., 2023) for the relations both datasets have
    "place of birth": "In what city was {} born?", "genre": "What genre is {}?", "country": "In what country is {}?",
    "capital of": "What is {} the capital of?", "color": "What color is {}?",
    "religion": "What is the religion of {}?", "sport": "What sport does {} play?",
    "capital": "What is the capital of {}?",
}
QUIET = Console(file=io.StringIO())


# ---------------------------------------------------------------------------------------------- parsing


def test_every_relation_form_parses_back():
    for r in RELATIONS:
        prompt = f"Ürümqi −1 {r.phrase}" if r.after else f"The {r.phrase} Ürümqi −1 is"
        assert wikidata.parse_input(prompt) == (r.name, "Ürümqi −1")
        assert wikidata.parse_input(prompt + " [MASK]") == (r.name, "Ürümqi −1")


@pytest.mark.parametrize("prompt, parsed", [
    ("Ürümqi is capital of", ("capital of", "Ürümqi")),
    ("The sport played by épée is", ("sport", "épée")),
    ("İbrahim Kaypakkaya given name", ("given name", "İbrahim Kaypakkaya")),
    ("−1 is followed by", ("followed by", "−1")),
    ("The country of citizenship of César Cedeño is [MASK]", ("country of citizenship", "César Cedeño")),
    ("The country of University of Copenhagen is", ("country", "University of Copenhagen")),
    ("The country for sport played by Boris Becker is", ("country for sport", "Boris Becker")),
    ("Aswan is located in or next to body of water", ("body of water", "Aswan")),
    ("The office held by head of government of Aceh is", ("office held by head of government", "Aceh")),
    ("The color of the flag of Sweden is", ("color", "the flag of Sweden")),
])
def test_prompts_parse_into_relation_and_subject(prompt, parsed):
    assert wikidata.parse_input(prompt) == parsed


def test_an_unknown_prompt_form_is_one_line_error():
    with pytest.raises(MergeabilityError, match="no known relation in the prompt 'Sweden is big'") as e:
        wikidata.parse_input("Sweden is big")
    assert "\n" not in str(e.value)


def test_the_fixture_covers_every_relation_and_is_read_like_the_task():
    records = wikidata.read_task(FIXTURE)
    assert {r.relation for r in records} == set(BY_NAME)  # every prompt form of the task
    assert len([r for r in records if r.subject == "30 Rock" and r.relation == "language"]) == 1  # asked twice
    assert not [r for r in records if "?" in r.subject]  # the title with a question mark is dropped
    by_key = {(r.relation, r.subject): r.answers for r in records}
    assert by_key[("language used", "Botswana")] == ("Tswana", "Afrikaans", "English")  # [MASK] and a list
    assert by_key[("capital of", "Brno")] == ("Moravia",)


@pytest.mark.parametrize("text, problem", [
    ('{"examples": [{"input": "Oslo is capital of", "target": 3}]}', "'target' must be a string"),
    ('{"examples": [{"target": "Norway"}]}', "'input' must be a string"),
    ('{"tasks": []}', "not a BIG-bench task.json"),
    ("not json", "not a BIG-bench task.json"),
])
def test_a_malformed_task_file_is_one_line_error(tmp_path, text, problem):
    path = tmp_path / "task.json"
    path.write_text(text)
    with pytest.raises(MergeabilityError, match=problem):
        wikidata.build_wikidata(path=path)


# ---------------------------------------------------------------------------------------------- facts


def test_facts_have_the_popqa_schema():
    facts = wikidata.build_wikidata(path=FIXTURE)
    assert facts
    records = {(r.relation, r.subject): r.answers for r in wikidata.read_task(FIXTURE)}
    for f in facts:
        assert f.prop in USABLE and f.id == f"wikidata/{f.prop.replace(' ', '_')}/{f.subj}"
        assert f.possible_answers == records[(f.prop, f.subj)] and f.obj == f.possible_answers[0]
        assert f.question == BY_NAME[f.prop].question.format(f.subj)
        assert isinstance(f.s_pop, float) and f.s_pop >= 1
        assert f.subj in f.passage and f.obj in f.passage


def test_popqa_relations_ask_popqa_questions_and_every_relation_has_wordings():
    for name, template in POPQA_TEMPLATES.items():
        assert BY_NAME[name].question == template
    for r in RELATIONS:
        assert r.question.count("{}") == 1 and r.question.endswith("?")
        assert len(r.wordings) >= 3 and len(set(r.wordings)) == len(r.wordings)
        for w in r.wordings:
            assert "{s}" in w and "{o}" in w and "?" not in w


def test_passages_state_every_fact_about_the_subject_and_never_a_question():
    facts = wikidata.build_wikidata(path=FIXTURE, per_subject=3)
    stockholm = next(f for f in facts if f.subj == "Stockholm")
    lines = stockholm.passage.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3  # each line words the facts differently; a 4th would repeat
    for line in lines:  # every line states all three facts, the unaskable official language included
        assert "Sweden" in line and "Swedish" in line
    for f in facts:
        assert "?" not in f.passage and f.question not in f.passage


def test_popularity_proxy_counts_the_facts_an_entity_takes_part_in():
    # Stockholm: the subject of three records and the answer of one (the capital of Sweden)
    facts = wikidata.build_wikidata(relations=["capital of"], path=FIXTURE)
    assert next(f for f in facts if f.subj == "Stockholm").s_pop == 4.0
    assert next(f for f in facts if f.subj == "Brno").s_pop == 1.0


def test_relation_filter_and_its_errors():
    facts = wikidata.build_wikidata(relations=["capital of"], path=FIXTURE)
    assert facts and {f.prop for f in facts} == {"capital of"}
    assert wikidata.usable_relations(path=FIXTURE) == USABLE
    with pytest.raises(MergeabilityError, match="unknown relation 'planet' for wikidata: choose from capital, "
                                                "capital of, country$"):
        wikidata.build_wikidata(relations=["planet"], path=FIXTURE)
    with pytest.raises(MergeabilityError, match="relation 'religion' has only 1 distinct answers"):
        wikidata.build_wikidata(relations=["religion"], path=FIXTURE)


def test_n_options_decides_which_relations_are_usable():
    assert wikidata.usable_relations(n_options=11, path=FIXTURE) == ["capital"]  # 11 distinct capitals
    assert {f.prop for f in wikidata.build_wikidata(n_options=11, path=FIXTURE)} == {"capital"}
    assert len(wikidata.usable_relations(n_options=2, path=FIXTURE)) > len(USABLE)


def test_a_task_whose_relations_lack_distractors_is_one_line_error(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [
        {"input": f"The capital of Country{i} is", "target": f"City{i}"} for i in range(7)]}))
    with pytest.raises(MergeabilityError, match="no relation has 8 distinct answers.*lower n_options") as e:
        wikidata.build_wikidata(path=path)
    assert "\n" not in str(e.value)
    assert len(wikidata.build_wikidata(path=path, n_options=7)) == 7


def test_answer_pool_holds_every_answer_of_the_relation():
    pool = wikidata.answer_pool("capital", path=FIXTURE)
    assert pool == sorted(pool) and len(pool) == len(set(pool))
    assert {"Damascus", "Baghdad", "Stockholm", "Oslo"} <= set(pool)  # both answers of a list target
    assert not {"Sweden", "Norway"} & set(pool)  # answers of other relations are not capitals
    with pytest.raises(MergeabilityError, match="unknown relation 'planet' for wikidata: choose from"):
        wikidata.answer_pool("planet", path=FIXTURE)


def test_items_draw_eight_distinct_options_from_the_pools():
    facts = wikidata.build_wikidata(path=FIXTURE)
    pools = {r: wikidata.answer_pool(r, path=FIXTURE) for r in {f.prop for f in facts}}
    for it in build_items(facts, pools=pools, n_options=8, seed=0):
        keys = [alias_key(o) for o in it.options]
        assert len(set(keys)) == 8 and it.options[it.gold] == it.fact.obj
        assert all(o in pools[it.fact.prop] for o in it.options)
        others = set(keys) - {alias_key(it.fact.obj)}
        assert not others & {alias_key(a) for a in it.fact.possible_answers}  # no right answer as a distractor


def test_one_item_per_subject_unless_asked_for_more():
    facts = wikidata.build_wikidata(path=FIXTURE)
    assert len({f.subj for f in facts}) == len(facts)
    more = wikidata.build_wikidata(path=FIXTURE, per_subject=2)
    assert sorted(f.prop for f in more if f.subj == "Stockholm") == ["capital of", "country"]
    with pytest.raises(MergeabilityError, match="per_subject must be ≥ 1"):
        wikidata.build_wikidata(path=FIXTURE, per_subject=0)


def test_the_sample_is_leak_free():
    for seed in range(5):
        facts = wikidata.build_wikidata(path=FIXTURE, seed=seed, per_subject=2)
        assert audit([Taught.of(f) for f in facts]) == set()
        ids = {f.id for f in facts}
        # the passage about Sweden states that Stockholm is its capital, and Stockholm's states Sweden's capital
        assert not {"wikidata/capital/Sweden", "wikidata/capital_of/Stockholm"} <= ids


def test_limit_and_seed_decide_the_sample():
    a = wikidata.build_wikidata(path=FIXTURE, limit=5, seed=1)
    assert len(a) == 5 and a == wikidata.build_wikidata(path=FIXTURE, limit=5, seed=1)
    assert [f.id for f in a] != [f.id for f in wikidata.build_wikidata(path=FIXTURE, limit=5, seed=2)]


def test_load_facts_and_answer_pools_dispatch_to_wikidata(monkeypatch):
    monkeypatch.setattr(wikidata, "bigbench_member", lambda path_inside: FIXTURE)
    facts = load_facts("wikidata", relations=["country"], limit=4, seed=0)
    assert len(facts) == 4 and {f.prop for f in facts} == {"country"}
    pools = answer_pools("wikidata", {"country", "capital"})
    assert pools == {r: wikidata.answer_pool(r, path=FIXTURE) for r in ("country", "capital")}
    assert answer_pools("my_popqa.jsonl", {"country"}) is None
    with pytest.raises(MergeabilityError, match="use geo, wikidata, popqa"):
        load_facts("wikidatum")


# ---------------------------------------------------------------------------------------------- the download

INDEX = "https://index.test/simple"
URL = "https://files.test/packages/bigbench-1.0.0.tar.gz"


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
    """A tiny bigbench sdist (noise before the wanted member, so it is streamed past), the archive description
    pinning its task.json, and the cache and index moved to test places."""
    task = FIXTURE.read_bytes()
    noise = random.Random(0).randbytes(40_000)  # incompressible: the archive is long enough to cut mid-way
    data = _tar({"bigbench-1.0.0/PKG-INFO": b"Name: bigbench\n", "bigbench-1.0.0/bigbench/noise.bin": noise,
                 f"bigbench-1.0.0/{bigbench.QA_WIKIDATA}": task})
    archive = bigbench.Archive("bigbench", "bigbench-1.0.0.tar.gz", "bigbench-1.0.0",
                               {bigbench.QA_WIKIDATA: hashlib.sha256(task).hexdigest()})
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "INDEX", INDEX)  # fetch reads MERGEABILITY_INDEX once, at import
    monkeypatch.setattr(fetch, "CHUNK", 4096)  # small reads, so a cut connection leaves a partial file
    return archive, data, task


def _serve(rs, data: bytes, *, body=None, callback=None) -> None:
    """The index entry of `data`, and the file: `body` (default `data`) or what `callback` answers."""
    files = [{"filename": "bigbench-1.0.0.tar.gz", "url": URL, "size": len(data),
              "hashes": {"sha256": hashlib.sha256(data).hexdigest()}}]
    rs.add(responses.GET, f"{INDEX}/bigbench/", json={"files": files})
    if callback is not None:
        rs.add_callback(responses.GET, URL, callback=callback)
    else:
        rs.add(responses.GET, URL, body=data if body is None else body)


def _file_gets(rs) -> list:
    return [c for c in rs.calls if c.request.url == URL]


def test_the_member_alone_is_extracted_and_the_sdist_kept(sdist, tmp_path):
    archive, data, task = sdist
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        path = bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET)
    assert path == tmp_path / "cache" / "bigbench-1.0.0" / bigbench.QA_WIKIDATA and path.read_bytes() == task
    assert (tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz").read_bytes() == data
    extracted = [p for p in (tmp_path / "cache" / "bigbench-1.0.0").rglob("*") if p.is_file()]
    assert extracted == [path]  # no other member, no temporary file left
    with responses.RequestsMock():  # cached and intact: no request at all (an unmocked one would fail)
        assert bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET) == path


def test_a_corrupt_cached_extraction_is_extracted_again(sdist):
    archive, data, task = sdist
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        path = bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET)
        path.write_bytes(task[: len(task) // 2])  # truncated, as by a full disk or a hand edit
        assert bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET).read_bytes() == task
        assert len(_file_gets(rs)) == 1  # rebuilt from the kept sdist, not downloaded again


def test_a_truncated_cached_download_is_fetched_again(sdist, tmp_path):
    archive, data, task = sdist
    kept = tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(data[:1000])
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        assert bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET).read_bytes() == task
        assert len(_file_gets(rs)) == 1
    assert kept.read_bytes() == data


def test_a_corrupt_download_is_fetched_once_more_then_an_error(sdist):
    archive, data, task = sdist
    bad = bytearray(data)
    bad[5000] ^= 0xFF
    with responses.RequestsMock() as rs:
        _serve(rs, data, body=bytes(bad))
        rs.add(responses.GET, URL, body=data)  # the second attempt gets the right bytes
        assert bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET).read_bytes() == task
        assert len(_file_gets(rs)) == 2
    archive = bigbench.Archive(archive.package, archive.filename, "other-root", archive.members)
    with responses.RequestsMock() as rs:
        rs.add(responses.GET, f"{INDEX}/bigbench/", json={"files": [{
            "filename": "bigbench-1.0.0.tar.gz", "url": URL, "hashes": {"sha256": "0" * 64}}]})
        rs.add(responses.GET, URL, body=data)
        with pytest.raises(MergeabilityError, match="checksum mismatch after two downloads"):
            bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET)


class _Cut(io.RawIOBase):
    """A response body whose connection drops after `cut` bytes."""

    def __init__(self, data: bytes, cut: int):
        self.data, self.cut, self.pos = data, cut, 0

    def readable(self):
        return True

    def readinto(self, b):
        if self.pos >= self.cut:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(b), self.cut - self.pos, 1024)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_an_interrupted_download_resumes_on_the_next_call(sdist, tmp_path):
    archive, data, task = sdist
    part = tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz.part"
    with responses.RequestsMock() as rs:
        _serve(rs, data, body=io.BufferedReader(_Cut(data, len(data) // 2)))
        with pytest.raises(MergeabilityError, match="run the command again to resume") as e:
            bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET)
        assert "\n" not in str(e.value)
    have = part.stat().st_size
    assert 0 < have <= len(data) // 2 and data.startswith(part.read_bytes())

    def rest(request):  # the server honours the range: only the missing bytes travel
        assert request.headers["Range"] == f"bytes={have}-"
        return 206, {}, data[have:]

    with responses.RequestsMock() as rs:
        _serve(rs, data, callback=rest)
        assert bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET).read_bytes() == task
    assert not part.exists()


def test_bad_member_paths_are_one_line_errors(sdist):
    archive, data, _ = sdist
    for bad in ("/etc/passwd", "../task.json", ""):
        with pytest.raises(MergeabilityError, match="is not a path inside bigbench-1.0.0.tar.gz"):
            bigbench.member(archive, bad, QUIET)
    with responses.RequestsMock() as rs:
        _serve(rs, data)
        with pytest.raises(MergeabilityError, match="has no file bigbench-1.0.0/bigbench/missing.json"):
            bigbench.member(archive, "bigbench/missing.json", QUIET)


def test_a_network_failure_names_the_fix(sdist):
    archive, _, _ = sdist
    with responses.RequestsMock() as rs:
        rs.add(responses.GET, f"{INDEX}/bigbench/", body=requests.ConnectionError("no route to host"))
        with pytest.raises(MergeabilityError, match="cannot read the package index for bigbench"):
            bigbench.member(archive, bigbench.QA_WIKIDATA, QUIET)
