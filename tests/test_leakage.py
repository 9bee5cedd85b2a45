"""Leak-free example data (issue #13): prose passages, one question per subject, partners apart by subject, the
training text stored, and the leakage audit of every run."""

import csv
import dataclasses
import json
import random
import re
import shutil
import sqlite3
from collections import Counter

import pytest
from rich.console import Console

from conftest import cfg_for, word_facts
from mergeability import MergeabilityError
from mergeability.analysis.summary import example_summary_rows
from mergeability.config import FLAT, ExampleData, from_flat
from mergeability.data import load_facts, prose
from mergeability.data.facts import Fact
from mergeability.data.geo import SENTENCES, TEMPLATES, build_geo, tables
from mergeability.data.leakage import Taught, audit, leak_free, mentions, per_subject_sample
from mergeability.estimate import partners_for, plan_trials, sample_apart
from mergeability.experiments import groups as groups_exp
from mergeability.experiments import locality
from mergeability.pipelines import run_examples
from mergeability.run import open_run
from mergeability.store import SCHEMA_VERSION, Store

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def geo200():
    return build_geo(limit=200, seed=0)


def fact(i, subj, obj, passage, prop="r", answers=()):
    return Fact(f"f{i}", subj, prop, obj, 1.0, f"q {subj}", (obj, *answers), passage)


# ------------------------------------------------------------------ prose passages


def test_geo_passages_are_prose_that_never_asks_a_question(geo200):
    asked = [t.split("{}")[0].strip().lower() for t in TEMPLATES.values()]  # the question, subject blanked
    assert all(asked)
    for f in geo200:
        text = f.passage.lower()
        assert "?" not in f.passage, f.passage
        assert not [a for a in asked if a in text], (f.id, f.passage)
        assert f.subj in f.passage and f.obj in f.passage  # the answer is stated, in a sentence, not a reply
        lines = f.passage.splitlines()
        assert len(lines) == prose.LINES and len(set(lines)) == len(lines)
    assert all(len(ws) >= 3 for ws in SENTENCES.values())
    for ws in SENTENCES.values():  # the wordings themselves: declarative, none a question
        assert not [w for w in ws if "?" in w or w.lower().startswith(("what", "in what", "which", "where"))]


def test_every_passage_states_everything_known_about_its_subject(geo200):
    countries, cities = tables()
    by_name = {c["name"]: c for c in countries.values()}
    for f in geo200:
        if f.prop in ("capital", "currency", "region"):
            c = by_name[f.subj]
            known = [c["capital"], c["currency"], c["region"]]
            known += [countries[n]["name"] for n in c["neighbours"] if n in countries]
        else:  # a city, or a capital: the country it lies in (or governs) and that country's region
            c = by_name[f.obj]
            known = [c["name"], c["region"]]
        assert all(k in f.passage for k in known), (f.id, known, f.passage)
        assert all(f.obj in line for line in f.passage.splitlines())  # every line (training sequence) states it


def test_prose_entry_words_each_fact_differently_on_every_line():
    sentences = {"a": ("{s} has {o}.", "{o} belongs to {s}."), "b": ("{s} is near {o}.",)}
    text = prose.entry("X", [("a", "Y"), ("b", "Z")], sentences, lines=2)
    assert text.splitlines() == ["X has Y. X is near Z.", "X is near Z. Y belongs to X."]
    with pytest.raises(MergeabilityError, match="no wording for relation 'c'"):
        prose.entry("X", [("c", "Y")], sentences)
    with pytest.raises(MergeabilityError, match="no facts about 'X'"):
        prose.entry("X", [], sentences)


# ------------------------------------------------------------------ one question per subject


def test_geo_asks_each_subject_once_and_keeps_relations_in_proportion(geo200):
    assert len(geo200) == 200 and len({f.id for f in geo200}) == 200
    assert max(Counter(f.subj for f in geo200).values()) == 1
    assert Counter(f.prop for f in geo200) == {r: 40 for r in TEMPLATES}
    assert [f.id for f in geo200] == [f.id for f in build_geo(limit=200, seed=0)]


def test_per_subject_two_allows_two_and_partners_never_share_the_subject():
    facts = build_geo(limit=200, seed=0, per_subject=2)
    by_subject = Counter(f.subj for f in facts)
    assert len(facts) == 200 and max(by_subject.values()) == 2
    ids, subject = [f.id for f in facts], {f.id: f.subj for f in facts}
    plan = plan_trials(3, ids, ids, 5, 40, subject)
    assert all(subject[p] != subject[t.target] for t in plan for p in t.partners)
    # without the grouping some trial would merge a target with its own subject's other item
    ungrouped = plan_trials(3, ids, ids, 5, 40)
    assert any(subject[p] == subject[t.target] for t in ungrouped for p in t.partners)


def test_per_subject_for_file_datasets(tmp_path):
    rows = [dict(id=f"q{i}", subj=f"s{i % 4}", prop=f"r{i % 3}", obj=f"o{i}", s_pop=1, question=f"q{i}?",
                 possible_answers=json.dumps([f"o{i}"])) for i in range(24)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = load_facts(str(p), seed=1)
    assert sorted(f.subj for f in one) == ["s0", "s1", "s2", "s3"]
    assert [f.id for f in one] == [f.id for f in load_facts(str(p), seed=1)]
    assert [f.id for f in one] != [f.id for f in load_facts(str(p), seed=2)]  # drawn by seed
    assert max(Counter(f.subj for f in load_facts(str(p), per_subject=2)).values()) == 2
    assert len(load_facts(str(p), per_subject=6)) == 24
    distinct = word_facts()  # distinct subjects: nothing drawn, the facts come back as they were
    assert per_subject_sample(distinct, 1, 0) == distinct
    with pytest.raises(MergeabilityError, match="--per-subject must be at least 1"):
        load_facts(str(p), per_subject=0)


def test_per_subject_is_a_data_setting_and_flag():
    assert ExampleData().per_subject == 1 and FLAT["per_subject"] == ("data", "per_subject")
    assert from_flat("examples", per_subject=3).data.per_subject == 3


# ------------------------------------------------------------------ partners apart by subject


def test_plans_with_distinct_groups_are_identical_to_ungrouped_plans():
    pool = [f"u{i}" for i in range(30)]
    plain = plan_trials(5, pool, pool, 4, 6)
    assert plan_trials(5, pool, pool, 4, 6, {u: f"subject {u}" for u in pool}) == plain
    assert plan_trials(5, pool, pool, 4, 6, {}) == plain  # updates the grouping does not name stand alone
    grouped = plan_trials(5, pool, pool, 4, 6, {u: str(int(u[1:]) % 10) for u in pool})
    assert grouped != plain
    assert all(int(p[1:]) % 10 != int(t.target[1:]) % 10 for t in grouped for p in t.partners)


def test_too_few_partners_outside_the_group_is_one_line():
    pool = [f"u{i}" for i in range(6)]
    with pytest.raises(MergeabilityError, match="larger than the pool of 3 other updates outside u0's group"):
        partners_for(0, "u0", 0, pool, 4, {u: str(int(u[1:]) % 2) for u in pool})


def test_sample_apart_draws_distinct_groups_and_equals_sample_when_all_are_distinct():
    pool = [f"u{i}" for i in range(40)]
    a, b = random.Random(1), random.Random(1)
    for n in (3, 10, 40, 50):  # successive draws from one rng: its state must match too
        assert sample_apart(a, pool, n, {u: u for u in pool}) == b.sample(pool, min(n, len(pool)))
    groups = {u: str(int(u[1:]) % 7) for u in pool}
    drawn = sample_apart(random.Random(2), pool, 10, groups, avoid=["u0"])
    assert len(drawn) == 6 and len({groups[u] for u in drawn}) == 6 and "0" not in {groups[u] for u in drawn}


def test_experiment_merge_sets_keep_members_apart():
    cfg = from_flat("examples", trials=4, partners=6, seed=0)
    rng = random.Random(0)
    sc = {f"u{i}": rng.randrange(5) / 4 for i in range(60)}
    distinct = {u: u for u in sc}
    for module in (locality, groups_exp):
        assert module.units(cfg, sc, distinct) == module.units(cfg, sc)  # all subjects distinct: same sets
        shared = {u: str(int(u[1:]) % 9) for u in sc}
        units = module.units(cfg, sc, shared)
        assert units and units != module.units(cfg, sc)
        for _, spec in units:
            assert len({shared[m] for m in spec["merge"]}) == len(spec["merge"]), spec


# ------------------------------------------------------------------ the audit and leak_free


def test_audit_reports_no_leak_on_a_clean_geo_sample_and_flags_a_planted_one(geo200):
    taught = [Taught.of(f) for f in geo200]
    assert audit(taught) == set()
    target = next(f for f in geo200 if f.prop == "country" and len(f.possible_answers) > 1)
    alias = target.possible_answers[-1]
    planted = Taught("planted", "Somewhere Else", ("x",), f"A trip from {target.subj} to {alias} takes a day.")
    assert audit([*taught, planted]) == {target.id}
    same = dataclasses.replace(planted, subject=target.subj)  # about the target's own subject: not a leak
    assert audit([*taught, same]) == set()


def test_mentions_are_whole_words_in_alias_key_form():
    assert mentions("the chadian border", "Chad") is False
    assert mentions("it borders chad and niger", "Chad") is True
    assert mentions("guineabissau lies west", "Guinea-Bissau") is True  # punctuation dropped on both sides
    assert mentions("anything", "") is False


def test_leak_free_contract():
    a = fact(0, "Ann", "alpha", "Ann is alpha.")
    b = fact(1, "Bob", "beta", "Bob is beta. Ann is alpha.")  # states a's fact: dropped after a
    c = fact(2, "Cid", "gamma", "Cid is gamma.")
    d = fact(3, "Dan", "delta", "Dan is delta.")
    e = fact(4, "Eve", "eps", "Eve is eps. Cid and Dan are neighbours, Dan is delta.")  # states d's fact
    a2 = fact(5, "Ann", "alpha two", "Ann is alpha two.")  # a's subject again
    assert leak_free([a, b, c]) == [a, c]
    assert leak_free([b, a, c]) == [b, c]  # first come, first kept: a is stated by b's passage
    assert leak_free([a, b, c, d, e], limit=2) == [a, c]
    assert leak_free([d, e]) == [d] and leak_free([e, d]) == [e]
    assert leak_free([a, a2, c], per_subject=1) == [a, c]  # one per subject …
    assert leak_free([a, a2, c], per_subject=2) == [a, a2, c]  # … same-subject items do not leak to each other
    kept = leak_free([a, b, c, d, e, a2])
    assert audit([Taught.of(f) for f in kept]) == set()
    r = [dataclasses.replace(f, prop=p) for f, p in zip((a, c, d), ("x", "x", "y"))]
    assert leak_free(r, limit=2, quotas={"x": 1, "y": 1}) == [r[0], r[2]]  # a quota holds r[1] back …
    assert leak_free(r, limit=3, quotas={"x": 1, "y": 1}) == [r[0], r[2], r[1]]  # … until the limit needs it


# ------------------------------------------------------------------ the store and the run


OLD_UPDATES = """CREATE TABLE updates (
    item_id TEXT PRIMARY KEY, path TEXT, kept INTEGER, train_loss REAL, passage_ppl REAL, passage_tokens INTEGER,
    post_scores TEXT, post_gold_prob REAL, post_gap REAL, fro_norm REAL, top_sv REAL
)"""


def to_schema_1(path):
    """Rewrite a store as the previous version wrote it: no `passage` column, schema_version 1."""
    db = sqlite3.connect(path)
    cols = "item_id, path, kept, train_loss, passage_ppl, passage_tokens, post_scores, post_gold_prob, post_gap, " \
           "fro_norm, top_sv"
    db.executescript(f"ALTER TABLE updates RENAME TO new_updates; {OLD_UPDATES}; "
                     f"INSERT INTO updates SELECT {cols} FROM new_updates; DROP TABLE new_updates; "
                     "UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    db.commit()
    db.close()


def columns(path):
    return [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(updates)")]


def test_a_schema_1_store_is_migrated_on_open(tmp_path):
    path = tmp_path / "results.sqlite"
    s = Store(path)
    s.add_update(dict(item_id="a", path="updates/a", kept=1, passage="A is alpha."))
    s.close()
    to_schema_1(path)
    assert "passage" not in columns(path)
    s = Store(path)
    assert s.get_meta("schema_version") == SCHEMA_VERSION == 2 and "passage" in columns(path)
    assert s.kept_passages() == {"a": None}  # the old row stays, with no recorded passage
    s.add_update(dict(item_id="b", path="updates/b", kept=1, passage="B is beta."))
    s.close()
    s = Store(path, lock=False)  # opening again changes nothing
    assert s.kept_passages() == {"a": None, "b": "B is beta."} and columns(path).count("passage") == 1
    s.set_meta("schema_version", 3)
    s.close()
    with pytest.raises(MergeabilityError, match="store schema 3, this version reads 2"):
        Store(path)


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory):
    """A tiny run whose passage of item i also states item i+1's fact: a leak wherever both are kept."""
    facts = word_facts()
    rows = []
    for i, f in enumerate(facts):
        nxt = facts[(i + 1) % len(facts)]
        rows.append(dict(id=f.id, subj=f.subj, prop=f.prop, obj=f.obj, s_pop=f.s_pop, question=f.question,
                         possible_answers=json.dumps(list(f.possible_answers)),
                         passage=f"{f.passage}\n{nxt.subj} w54 {nxt.obj}"))
    d = tmp_path_factory.mktemp("planted")
    (d / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "run"
    summary = run_examples(cfg_for(tiny_model_dir, d / "facts.jsonl"), out, console=QUIET)
    return out, summary, {r["id"]: r for r in rows}


def test_the_run_stores_passages_and_flags_its_leaks(planted):
    out, summary, rows = planted
    db = sqlite3.connect(out / "results.sqlite")
    stored = dict(db.execute("SELECT item_id, passage FROM updates"))
    assert stored and all(stored[i] == rows[i]["passage"] for i in stored)
    with (out / "scores.csv").open() as f:
        scores = {r["id"]: r for r in csv.DictReader(f)}
    kept = set(scores)
    expected = {i for i in kept if f"f{(int(i[1:]) - 1) % 20}" in kept}  # its fact is in the previous passage
    assert expected, "the planted data should give at least one leak"
    assert {i for i, r in scores.items() if r["leak"] == "1"} == expected
    assert {r["leak"] for r in scores.values()} <= {"0", "1"}
    meta = Store(out / "results.sqlite", lock=False).get_meta("leakage")
    assert meta == {"leaking": len(expected), "audited": summary["kept"], "ids": sorted(expected)}
    assert summary["leakage"]["leaking"] == len(expected)
    assert ["leaking updates", f"{len(expected)} of {summary['kept']}"] in example_summary_rows(summary)


def test_an_old_store_resumes_to_the_same_scores(planted, tmp_path):
    out, _, _ = planted
    old = tmp_path / "old"
    shutil.copytree(out, old)
    to_schema_1(old / "results.sqlite")
    cfg, store = open_run(old, lock=False)
    store.close()
    run_examples(cfg, old, resume=True, console=QUIET)
    assert "passage" in columns(old / "results.sqlite")
    assert (old / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()  # leaks found as before


def test_bad_per_subject_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(MergeabilityError, match=re.escape("--per-subject must be at least 1")):
        run_examples(cfg_for(tiny_model_dir, "unused.jsonl", per_subject=0), tmp_path / "run", console=QUIET)
    assert not (tmp_path / "run").exists()
