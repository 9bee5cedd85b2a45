"""Training passages for PopQA-schema data without them: a passages file, or Wikipedia through a mocked
MediaWiki API (no test touches the network)."""

import io
import json
from urllib.parse import parse_qs, urlparse

import pytest
import responses
from rich.console import Console
from transformers import AutoTokenizer

from conftest import cfg_for, run_cli, word_facts
from mergeability.config import PRESETS, load_config, override
from mergeability.data import Fact
from mergeability.data import passages as ps
from mergeability.data import wikipedia as wp
from mergeability.errors import MergeabilityError
from mergeability.pipelines.examples import prepare_examples
from mergeability.training import split_passage

PARIS = ("Paris is the capital and largest city of France.\nIts  museums   are famous.\n\n\n== History ==\n"
         "=== Origins ===\nThe Parisii lived there.\n\n\n== See also ==\nList of cities in France\n\n\n"
         "== References ==\n")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test its own download cache."""
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "wikipedia"


class FakeWiki:
    """The MediaWiki query API as far as the fetcher uses it: titles normalised and redirected, missing pages,
    disambiguation pageprops, one whole-page extract per response with `excontinue` for the next.
    `fail`: HTTP statuses to answer with before (or, with `fail_after`, after that many good answers)."""

    def __init__(self, pages, redirects=None, disambiguation=(), fail=(), fail_after=None):
        self.pages, self.redirects, self.disambiguation = pages, redirects or {}, set(disambiguation)
        self.fail, self.fail_after, self.calls = list(fail), fail_after, []

    def __call__(self, request):
        params = {k: v[0] for k, v in parse_qs(urlparse(request.url).query).items()}
        self.calls.append((params, request.headers.get("User-Agent", "")))
        answered = len(self.calls) - 1  # requests before this one
        if self.fail and (self.fail_after is None or answered >= self.fail_after):
            return self.fail.pop(0), {"Retry-After": "0"}, "busy"
        assert params["action"] == "query" and params["exlimit"] == "1" and params["redirects"] == "1"
        titles = params["titles"].split("|")
        assert len(titles) <= wp.TITLES_PER_REQUEST
        norm = {t: (t.replace("_", " ")[:1].upper() + t.replace("_", " ")[1:]) for t in titles}
        final = {t: self.redirects.get(n, n) for t, n in norm.items()}
        pages = []
        for title in dict.fromkeys(final.values()):
            if title not in self.pages:
                pages.append({"ns": 0, "title": title, "missing": True})
                continue
            page = {"ns": 0, "title": title, "pageid": 1 + sorted(self.pages).index(title), "lastrevid": 7}
            if title in self.disambiguation:
                page["pageprops"] = {"disambiguation": ""}
            pages.append(page)
        present = [p for p in pages if not p.get("missing")]
        offset = int(params.get("excontinue", 0))
        if offset < len(present):
            present[offset]["extract"] = self.pages[present[offset]["title"]]
        query = {"pages": pages,
                 "normalized": [{"from": t, "to": n} for t, n in norm.items() if t != n],
                 "redirects": [{"from": n, "to": self.redirects[n]} for n in dict.fromkeys(norm.values())
                               if n in self.redirects]}
        body = {"batchcomplete": offset + 1 >= len(present), "query": query}
        if offset + 1 < len(present):
            body["continue"] = {"excontinue": offset + 1, "continue": "||pageprops|info"}
        return 200, {}, json.dumps(body)


def serve(fake):
    responses.add_callback(responses.GET, wp.API, callback=fake)
    return fake


# ------------------------------------------------------------------------------------------- page text


def test_page_text_is_one_paragraph_per_line_without_headings_or_end_matter(tiny_model_dir):
    text = wp.page_text(PARIS)
    assert text.splitlines() == ["Paris is the capital and largest city of France.", "Its museums are famous.",
                                 "The Parisii lived there."]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = wp.page_text("w1 w2 w3\n\n\n== History ==\nw4  w5\n\n\n== External links ==\nw6 w7\n")
    seqs = split_passage(tok, words, max_tokens=8)
    assert [s.shape[1] for s in seqs] == [3, 2]  # one training sequence per paragraph, the links section gone


# ------------------------------------------------------------------------------------- Wikipedia fetcher


@responses.activate
def test_titles_are_batched_within_the_api_limit_one_extract_per_response():
    pages = {f"Subject {i}": f"Subject {i} is a thing.\nIt is number {i}." for i in range(120)}
    fake = serve(FakeWiki(pages))
    shown = io.StringIO()
    got = wp.fetch_pages(list(pages), backoff=0, console=Console(file=shown, width=200))
    assert got.missing == {}
    assert got.texts == pages
    assert "fetching 120 Wikipedia pages (0 cached)" in shown.getvalue()
    assert "wikipedia  120/120 (100%)" in shown.getvalue()  # the progress line off a terminal
    batches = [tuple(p["titles"].split("|")) for p, _ in fake.calls]
    assert [len(b) for b in dict.fromkeys(batches)] == [50, 50, 20]  # three batches, each read to its end
    assert len(fake.calls) == 120  # one whole-page extract per response
    assert all(ua.startswith("mergeability/") and "python-requests" in ua for _, ua in fake.calls)


@responses.activate
def test_normalised_and_redirected_titles_map_back_to_subjects():
    fake = serve(FakeWiki({"Paris": PARIS, "Bob Marley": "Bob Marley was a singer."},
                          redirects={"City of Light": "Paris", "Marley": "Bob Marley"}))
    got = wp.fetch_pages(["paris", "City_of_Light", "Marley", "Bob Marley"], backoff=0)
    assert got.missing == {}
    assert got.texts["paris"] == got.texts["City_of_Light"] == wp.page_text(PARIS)
    assert got.texts["Marley"] == got.texts["Bob Marley"] == "Bob Marley was a singer."
    assert len(fake.calls) == 2  # two distinct pages behind four titles


@responses.activate
def test_missing_invalid_and_disambiguation_pages_are_reported():
    serve(FakeWiki({"Paris": PARIS, "Mercury": "Mercury may refer to:\nMercury (planet)"},
                   disambiguation={"Mercury"}))
    got = wp.fetch_pages(["Paris", "Nowhere Land", "Mercury", "a|b"], backoff=0)
    assert list(got.texts) == ["Paris"]
    assert got.missing == {"Nowhere Land": "no such page", "Mercury": "a disambiguation page",
                           "a|b": "not a valid page title"}
    with pytest.raises(MergeabilityError) as e:
        ps.with_passages([_fact("f1", "Paris"), _fact("f2", "Nowhere Land")], "wikipedia", "x.jsonl")
    msg = str(e.value)
    assert "\n" not in msg and "1 of 2 subjects" in msg and "'Nowhere Land': no such page" in msg
    assert "--passages FILE" in msg


@responses.activate
def test_a_cached_page_is_never_fetched_again(cache):
    fake = serve(FakeWiki({"Paris": PARIS}))
    first = wp.fetch_pages(["Paris"], backoff=0)
    assert len(fake.calls) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob(".*"))  # written atomically: no temporary left beside it
    again = wp.fetch_pages(["Paris"], backoff=0)
    assert len(fake.calls) == 1 and again.texts == first.texts


@responses.activate
def test_a_killed_fetch_resumes_without_refetching_what_arrived():
    pages = {f"Subject {i}": f"Text {i}." for i in range(5)}
    fake = serve(FakeWiki(pages, fail=[503], fail_after=2))  # two pages arrive, then the API fails
    with pytest.raises(MergeabilityError, match="HTTP 503"):
        wp.fetch_pages(list(pages), retries=0, backoff=0)
    fake.calls.clear()
    got = wp.fetch_pages(list(pages), backoff=0)
    assert got.texts == pages
    assert fake.calls[0][0]["titles"].split("|") == [f"Subject {i}" for i in range(2, 5)]


@responses.activate
def test_503_and_429_are_retried_with_exponential_backoff(monkeypatch):
    waits = []
    monkeypatch.setattr(wp.time, "sleep", waits.append)
    fake = serve(FakeWiki({"Paris": PARIS}, fail=[503, 429, 502]))
    got = wp.fetch_pages(["Paris"], backoff=0.5)
    assert got.texts == {"Paris": wp.page_text(PARIS)}
    assert len(fake.calls) == 4 and waits == [0.5, 1.0, 2.0]


@responses.activate
def test_a_lagging_api_is_waited_for_as_long_as_it_asks(monkeypatch):
    waits = []
    monkeypatch.setattr(wp.time, "sleep", waits.append)
    responses.add(responses.GET, wp.API, json={"error": {"code": "maxlag", "info": "Waiting for a replica"}},
                  headers={"Retry-After": "7"})
    serve(FakeWiki({"Paris": PARIS}))
    assert wp.fetch_pages(["Paris"], backoff=0.5).texts == {"Paris": wp.page_text(PARIS)}
    assert waits == [7.0]


@responses.activate
def test_an_unreachable_network_is_one_line_naming_both_ways():
    # no URL registered: `responses` refuses the connection, as a machine without network would
    with pytest.raises(MergeabilityError) as e:
        wp.fetch_pages(["Paris"], retries=2, backoff=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot reach Wikipedia") and "3 tries" in msg
    assert "--passages FILE" in msg and "--passages wikipedia" in msg


@responses.activate
def test_an_api_error_is_one_line():
    responses.add(responses.GET, wp.API, json={"error": {"code": "toomanyvalues", "info": "Too many\nvalues"}})
    with pytest.raises(MergeabilityError, match=r"toomanyvalues: Too many\); give the passages"):
        wp.fetch_pages(["Paris"], backoff=0)


# ------------------------------------------------------------------------------------------ passages file


def _fact(id_, subj, passage=None):
    return Fact(id_, subj, "r0", "w99", 1.0, f"w40 {subj} w50", ("w99",), passage)


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".tsv":
        cols = list(rows[0])
        path.write_text("\t".join(cols) + "\n" + "".join("\t".join(r[c] for c in cols) + "\n" for r in rows))
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("name, cols", [("p.jsonl", ("subj", "passage")), ("p.tsv", ("subject", "text")),
                                        ("p.parquet", ("subj", "text"))])
def test_a_passages_file_attaches_by_subject(tmp_path, name, cols):
    facts = [_fact("f1", "w1", "old"), _fact("f2", "w2"), _fact("f3", "w1")]
    path = _write(tmp_path / name, [{cols[0]: "w1", cols[1]: "w1 w51 w99 ."}, {cols[0]: "w2", cols[1]: "w2 w52"},
                                    {cols[0]: "w7", cols[1]: "unused"}])
    out = ps.with_passages(facts, str(path), "data.jsonl")
    assert [f.passage for f in out] == ["w1 w51 w99 .", "w2 w52", "w1 w51 w99 ."]  # the file replaces "old"
    assert [f.id for f in out] == ["f1", "f2", "f3"] and out[0].question == facts[0].question


def test_passages_file_errors_are_one_line(tmp_path):
    facts = [_fact(f"f{i}", f"w{i}") for i in range(20)]
    cases = {
        "no such file": (str(tmp_path / "none.jsonl"), None),
        "no column subj (or subject)": (tmp_path / "a.jsonl", [{"name": "w1", "passage": "x"}]),
        "no column passage (or text)": (tmp_path / "b.jsonl", [{"subj": "w1", "body": "x"}]),
        "3 of 20 subjects of this run have no passage (e.g. 'w17')":
            (tmp_path / "c.jsonl", [{"subj": f"w{i}", "passage": "w1 w2"} for i in range(17)]),
        "a second, different passage for 'w1' (first in row 1)":
            (tmp_path / "d.jsonl", [{"subj": "w1", "passage": "x"}, {"subj": "w1", "passage": "y"}]),
        "row 1: empty passage for 'w1'": (tmp_path / "e.jsonl", [{"subj": "w1", "passage": " "}]),
        "not a passages file": (str(tmp_path / "passages.txt"), None),
    }
    for expected, (path, rows) in cases.items():
        if rows is not None:
            _write(path, rows)
        with pytest.raises(MergeabilityError) as e:
            ps.with_passages(facts, str(path), "data.jsonl")
        assert expected in str(e.value) and "\n" not in str(e.value), (expected, str(e.value))


def test_facts_without_passages_and_no_source_name_both_ways():
    with pytest.raises(MergeabilityError) as e:
        ps.with_passages([_fact("f1", "w1", "w1 w2"), _fact("f2", "w2")], None, "mine.jsonl")
    msg = str(e.value)
    assert "1 of 2 facts have no training passage (e.g. f2, subject 'w2')" in msg
    assert "--passages FILE" in msg and "--passages wikipedia" in msg
    with pytest.raises(MergeabilityError, match="PopQA from the hub has no training passages"):
        ps.check_passage_source("popqa", None)
    ps.check_passage_source("popqa", "wikipedia")  # no error: nothing to check before the fetch


# ---------------------------------------------------------------------------------- config, CLI, pipeline


def test_paper_presets_train_on_wikipedia_and_the_flag_overrides():
    for name in ("paper-llama", "paper-qwen"):
        cfg = load_config(None, name)
        assert cfg.data.dataset == "popqa" and cfg.data.passages == "wikipedia"
        assert override(cfg, passages="mine.jsonl").data.passages == "mine.jsonl"
    assert "passages" not in PRESETS["demo"].get("data", {}) and load_config(None, "demo").data.passages is None


def _no_passage_dataset(path):
    rows = [dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop, question=f.question,
                 possible_answers=json.dumps(list(f.possible_answers))) for f in word_facts()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("extra, expected", [
    ((), "20 of 20 facts have no training passage"),
    (("--dataset", "popqa"), "PopQA from the hub has no training passages"),
    (("--passages", "PASSAGES"), "2 of 20 subjects of this run have no passage"),
])
def test_cli_without_passages_exits_2_before_writing(tmp_path, capsys, tiny_model_dir, extra, expected):
    data = _no_passage_dataset(tmp_path / "facts.jsonl")
    _write(tmp_path / "passages.jsonl", [{"subj": f.subj, "passage": "w1 w2"} for f in word_facts()[:18]])
    extra = [str(tmp_path / "passages.jsonl") if a == "PASSAGES" else a for a in extra]
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", data, "--items", 20,
                            "--partners", 2, *extra, "--out", out], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    if "--passages" not in extra:
        assert "--passages FILE" in err and "--passages wikipedia" in err
    assert not out.exists()


def test_prepared_items_train_on_the_passages_file(tmp_path, tiny_model_dir):
    data = _no_passage_dataset(tmp_path / "facts.jsonl")
    texts = {f.subj: f"{f.subj} w60 w61 .\n{f.subj} w62" for f in word_facts()}
    path = _write(tmp_path / "passages.jsonl", [{"subject": s, "text": t} for s, t in texts.items()])
    prep = prepare_examples(cfg_for(tiny_model_dir, data, passages=str(path)))
    assert len(prep.items) == 20 and all(it.fact.passage == texts[it.fact.subj] for it in prep.items)


@responses.activate
def test_prepared_items_train_on_wikipedia_pages(tmp_path, tiny_model_dir):
    data = _no_passage_dataset(tmp_path / "facts.jsonl")
    pages = {f.subj.capitalize(): f"{f.subj} w60 w61 .\n\n\n== See also ==\nw9 w9" for f in word_facts()}
    serve(FakeWiki(pages))
    prep = prepare_examples(cfg_for(tiny_model_dir, data, passages="wikipedia"))
    assert all(it.fact.passage == f"{it.fact.subj} w60 w61 ." for it in prep.items)
