import json

import pytest

from mergeability import MergeabilityError
from mergeability.data import alias_key, build_items, load_facts
from mergeability.data.facts import load_file
from mergeability.data.geo import RELATIONS, answer_pool, build_geo

ROW = dict(id="1", subj="Lyon", prop="country", obj="France", s_pop=500, question="In what country is Lyon?",
           possible_answers=json.dumps(["France", "French Republic"]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loads_tsv_jsonl_parquet(tmp_path):
    import pandas as pd

    rows = [dict(ROW, id=str(i)) for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.tsv", "d.jsonl", "d.parquet"):
        facts = load_file(tmp_path / name)
        assert len(facts) == 3 and facts[0].possible_answers == ("France", "French Republic")
        assert facts[0].s_pop == 500.0


@pytest.mark.parametrize("change, match", [
    ({"obj": None}, "row 2: missing column 'obj'"),
    ({"possible_answers": "[not json"}, "row 2, column 'possible_answers'"),
    ({"s_pop": "many"}, "row 2, column 's_pop'"),
])
def test_schema_errors_name_file_row_column(tmp_path, change, match):
    bad = dict(ROW, **change)
    if change.get("obj", 1) is None:
        del bad["obj"]
    p = write_jsonl(tmp_path / "bad.jsonl", [ROW, bad])
    with pytest.raises(MergeabilityError, match=match) as e:
        load_file(p)
    assert "bad.jsonl" in str(e.value)


def test_unknown_dataset_file_type_and_relation(tmp_path):
    with pytest.raises(MergeabilityError, match="unknown dataset"):
        load_facts("nonsense")
    (tmp_path / "x.xml").write_text("<x/>")
    with pytest.raises(MergeabilityError, match="unknown file type"):
        load_facts(str(tmp_path / "x.xml"))
    with pytest.raises(MergeabilityError, match="unknown relation 'planet'"):
        load_facts("geo", relations=["planet"])
    p = write_jsonl(tmp_path / "d.jsonl", [ROW])
    with pytest.raises(MergeabilityError, match="unknown relation 'capital'"):
        load_facts(str(p), relations=["capital"])


def test_geo_builds_a_balanced_seeded_subset():
    facts = build_geo(limit=25, seed=3)
    assert len(facts) == 25
    assert {f.prop for f in facts} == set(RELATIONS)
    assert [f.id for f in facts] == [f.id for f in build_geo(limit=25, seed=3)]
    assert [f.id for f in facts] != [f.id for f in build_geo(limit=25, seed=4)]
    for f in facts:
        assert f.passage and f.subj in f.passage and f.obj in f.passage
        assert f.obj in f.possible_answers and f.s_pop > 0
    for r in RELATIONS:
        assert len(answer_pool(r)) >= 8


def test_alias_key():
    assert alias_key("The  United-States!") == "unitedstates"
    assert alias_key("an Apple") == "apple"


def test_multiple_choice_invariants():
    facts = build_geo(limit=60, seed=0)
    pools = {r: answer_pool(r) for r in RELATIONS}
    items = build_items(facts, pools=pools, seed=1)
    again = build_items(facts, pools=pools, seed=1)
    assert [(i.options, i.prompt) for i in items] == [(i.options, i.prompt) for i in again]
    other = build_items(facts, pools=pools, seed=2)
    assert [i.options for i in items] != [i.options for i in other]
    for it in items:
        assert len(it.options) == 8 and len({alias_key(o) for o in it.options}) == 8
        assert it.options.count(it.fact.obj) == 1 and it.options[it.gold] == it.fact.obj
        aliases = {alias_key(a) for a in it.fact.possible_answers}
        assert not any(alias_key(o) in aliases for i, o in enumerate(it.options) if i != it.gold)
        assert it.prompt.count(it.fact.question) == 1 and it.prompt.endswith(f"Question: {it.fact.question}\nAnswer:")
        assert it.prompt.count("Question:") == 4  # k = 3 solved examples
        shots = it.prompt.split("\n\n")[:-1]
        assert all(it.fact.question not in s for s in shots)
    # the 'any' pool draws distractors across relations
    anyi = build_items(facts, pools=pools, distractors="any", seed=1)
    assert any(set(a.options) - set(pools[a.fact.prop]) for a in anyi)


def test_too_few_distinct_answers_is_an_error(tmp_path):
    rows = [dict(ROW, id=str(i), obj=f"A{i % 3}", possible_answers=json.dumps([f"A{i % 3}"])) for i in range(6)]
    facts = load_file(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(MergeabilityError, match="only 3 distinct answers"):
        build_items(facts)
