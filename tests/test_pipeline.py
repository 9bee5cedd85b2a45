import json
import sqlite3

import pytest
from rich.console import Console

from conftest import cfg_for, run_cli
from mergeability import MergeabilityError, load_update
from mergeability.pipelines import run_examples
from mergeability.store import Store

QUIET = Console(quiet=True)


class Killed(Exception):
    pass


def kill_after(monkeypatch, method, n):
    orig = getattr(Store, method)
    calls = {"n": 0}

    def wrapped(self, *row):
        if calls["n"] >= n:
            raise Killed
        calls["n"] += 1
        orig(self, *row)

    monkeypatch.setattr(Store, method, wrapped)
    return calls


def test_run_writes_store_scores_and_adapters(tiny_model_dir, dataset, tmp_path):
    s = run_examples(cfg_for(tiny_model_dir, dataset), tmp_path / "run", console=QUIET)
    assert s["screened"] == 20 and s["kept"] > 2 and sum(s["histogram"].values()) == s["kept"]
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    n_trials, = db.execute("SELECT COUNT(*) FROM trials").fetchone()
    assert n_trials == 3 * s["kept"]
    row = db.execute("SELECT partners, probs, params FROM trials LIMIT 1").fetchone()
    assert len(json.loads(row[0])) == 2 and abs(sum(json.loads(row[1])) - 1) < 1e-6 and "knots" in row[2]
    lines = (tmp_path / "run" / "scores.csv").read_text().splitlines()
    assert len(lines) == s["kept"] + 1 and lines[0].startswith("id,score,") and lines[0].endswith(",leak")
    assert all(line.endswith(",0") for line in lines[1:]) and s["leakage"]["leaking"] == 0  # distinct words
    for p in (tmp_path / "run" / "updates").iterdir():
        assert load_update(p).modules
    prov = Store(tmp_path / "run" / "results.sqlite").get_meta("provenance")
    assert prov["model"] == str(tiny_model_dir) and prov["seed"] == 0 and "version" in prov


def test_killed_and_resumed_run_matches_uninterrupted(tiny_model_dir, dataset, tmp_path, monkeypatch):
    cfg = cfg_for(tiny_model_dir, dataset)
    run_examples(cfg, tmp_path / "ref", console=QUIET)
    out = tmp_path / "killed"
    with monkeypatch.context() as m:  # killed in training …
        kill_after(m, "add_update", 3)
        with pytest.raises(Killed):
            run_examples(cfg, out, console=QUIET)
    with monkeypatch.context() as m:  # … and again in the trials
        kill_after(m, "add_trial", 4)
        with pytest.raises(Killed):
            run_examples(cfg, out, resume=True, console=QUIET)
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 4
    with monkeypatch.context() as m:
        calls = kill_after(m, "add_trial", 10**9)
        s = run_examples(cfg, out, resume=True, console=QUIET)
    assert calls["n"] == 3 * s["kept"] - 4  # no recorded trial was redone
    assert (out / "scores.csv").read_bytes() == (tmp_path / "ref" / "scores.csv").read_bytes()
    dup = db.execute("SELECT COUNT(*) FROM (SELECT target, trial FROM trials GROUP BY target, trial "
                     "HAVING COUNT(*) > 1)").fetchone()[0]
    assert dup == 0


def test_existing_run_needs_resume(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "x").write_text("1")
    with pytest.raises(MergeabilityError, match="--resume"):
        run_examples(cfg_for(tiny_model_dir, dataset), out, console=QUIET)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    return d


BAD_RUNS = {
    "unknown dataset": (["--dataset", "nowhere"], "unknown dataset"),
    "unknown relation": (["--relations", "r0,planet"], "unknown relation 'planet'"),
    "not a causal LM": (["--model", "BERT"], "not a causal LM"),
    "layer out of range": (["--layer", "7"], "layer 7 is out of range"),
    "partners > pool": (["--partners", "20"], "larger than the pool"),
    "items 0": (["--items", "0"], "--items must be at least 1"),
    "per-subject 0": (["--per-subject", "0"], "--per-subject must be at least 1"),
    "unknown method": (["--method", "soup"], "unknown merge method"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_run_bad_input(tiny_model_dir, dataset, bert_dir, tmp_path, capsys, case):
    opts, match = BAD_RUNS[case]
    opts = [str(bert_dir) if o == "BERT" else o for o in opts]
    base = ["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20", "--partners", "2",
            "--layer", "1", "--out", tmp_path / "run"]
    code, _, err = run_cli([*base, *opts], capsys)
    assert code == 2 and err.startswith("error:") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_target_module(tiny_model_dir, dataset, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: [mlp.nope]\n")
    code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--config", cfg,
                         "--out", tmp_path / "run"], capsys)
    assert code == 2 and "no module" in err and not (tmp_path / "run").exists()


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("items: 3\nfoo: 1\nbar: 2\n")
    code, _, err = run_cli(["run", "popqa", "--config", bad, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "unknown keys bar, foo" in err
    bad.write_text("items: [1,\n")
    code, _, err = run_cli(["run", "popqa", "--config", bad, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "invalid YAML at line" in err


def test_experiments_resume_and_reach_the_report(tiny_model_dir, dataset, tmp_path, monkeypatch):
    from mergeability.estimate import params_key
    from mergeability.experiments import run_experiment
    from mergeability.report.build import build_report
    from mergeability.run import scores

    cfg = cfg_for(tiny_model_dir, dataset)
    run = tmp_path / "run"
    s = run_examples(cfg, run, console=QUIET)
    key = params_key(cfg.merge.method, {"partners": cfg.merge.partners})
    main_scores = lambda: scores(Store(run / "results.sqlite"), key, [f"f{i}" for i in range(20)], cfg.merge.trials)  # noqa: E731
    before = main_scores()
    with monkeypatch.context() as m:
        kill_after(m, "add_trial", 5)
        with pytest.raises(Killed):
            run_experiment("algorithms", run, QUIET)
    with monkeypatch.context() as m:
        calls = kill_after(m, "add_trial", 10**9)
        run_experiment("algorithms", run, QUIET)
        assert calls["n"] == 2 * 3 * s["kept"] - 5  # ties and mean, M trials each; nothing redone
        run_experiment("robustness", run, QUIET)
        assert calls["n"] == 2 * 3 * s["kept"] - 5 + 2 * 3 * s["kept"]  # 3 more trials each, and N/2
        assert main_scores() == before  # the extra trials share the run's key but never change its scores
        run_experiment("algorithms", run, QUIET)  # all recorded: no new work
        assert calls["n"] == 4 * 3 * s["kept"] - 5
    html, claims = build_report(run)
    by = {c.claim: c for c in claims}
    for claim in ("Scores agree across merge methods (A.9)", "Scores agree across M and N (A.3)",
                  "Weaker merge methods put more updates at score 1.0 (§5.2)"):
        assert "mergeability experiment" not in by[claim].evidence
    text = html.read_text()
    assert "Score distribution by merge method" in text and "Robustness of scores to M and N" in text
    assert f"<td>leaking updates</td><td>0 of {s['kept']}</td>" in text  # the run's leakage audit, in the summary
    with pytest.raises(MergeabilityError, match="unknown experiment"):
        run_experiment("nope", run, QUIET)


def test_more_trials_evaluate_only_the_new_ones(tiny_model_dir, dataset, tmp_path, monkeypatch):
    """Robustness's M = 2M stage plans trials M..2M-1 alone: no chunk re-evaluates a trial the run recorded (with
    them interleaved in the plan nearly every chunk held a new trial, and every row of it was evaluated again)."""
    from mergeability import estimate
    from mergeability.experiments import run_experiment

    cfg = cfg_for(tiny_model_dir, dataset)
    run = tmp_path / "run"
    kept = run_examples(cfg, run, console=QUIET)["kept"]
    rows, chunk = [], estimate.trial_chunk

    def counted(evaluate, updates, payload):  # payload = (method, params, trials of the chunk, reference)
        rows.extend(payload[2])
        return chunk(evaluate, updates, payload)

    monkeypatch.setattr(estimate, "trial_chunk", counted)
    run_experiment("robustness", run, QUIET)
    m = cfg.merge.trials
    more = sorted((t.target, t.trial) for t in rows if t.trial >= m)
    assert more == sorted((u, k) for u in {t.target for t in rows} for k in range(m, 2 * m)) and len(more) == m * kept
    assert len(rows) == 2 * m * kept  # the new M trials and the N/2 run's M: nothing evaluated twice


def test_locality_and_groups_experiments(tiny_model_dir, dataset, tmp_path, monkeypatch):
    from mergeability.experiments import groups, locality, run_experiment
    from mergeability.report.build import build_report
    from mergeability.run import example_scores

    cfg = cfg_for(tiny_model_dir, dataset)
    run = tmp_path / "run"
    run_examples(cfg, run, console=QUIET)
    with monkeypatch.context() as m:
        kill_after(m, "add_experiment", 3)
        with pytest.raises(Killed):
            run_experiment("groups", run, QUIET)
    run_experiment("groups", run, QUIET)
    run_experiment("locality", run, QUIET)
    store = Store(run / "results.sqlite")
    sc = example_scores(cfg, store)
    assert len(store.experiment_rows("groups")) == len(groups.units(cfg, sc))
    subjects = {r["id"]: r["subj"] for r in store.kept_update_rows()}
    assert len(store.experiment_rows("locality")) == len(locality.units(cfg, sc, subjects)) > 0
    html, claims = build_report(run)
    text = html.read_text()
    assert "Locality: fixed sets of top-score updates" in text and "mixing lowest- and highest-score" in text
    local = next(c for c in claims if c.claim.startswith("Mergeability is local"))
    assert "mergeability experiment" not in local.evidence


def test_a_live_run_locks_its_directory(tiny_model_dir, dataset, tmp_path, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mergeability.store import Store; "
                               f"s = Store({str(out / 'results.sqlite')!r}); print('locked', flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.iterdir())
        store_bytes = (out / "results.sqlite").read_bytes()
        with pytest.raises(MergeabilityError, match=f"in use by process {holder.pid}"):
            run_examples(cfg_for(tiny_model_dir, dataset), out, resume=True, console=QUIET)
        code, _, err = run_cli(["run", "popqa", "--model", tiny_model_dir, "--dataset", dataset, "--items", "20",
                                "--partners", "2", "--out", out, "--resume"], capsys)
        assert code == 2 and f"in use by process {holder.pid}" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == before
        assert (out / "results.sqlite").read_bytes() == store_bytes
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run_examples(cfg_for(tiny_model_dir, dataset), out, resume=True, console=QUIET)  # the dead holder's lock is gone


def test_plain_engine_run_matches_the_fast_one(tiny_model_dir, dataset, tmp_path):
    """`--engine plain` is the end-to-end check of the fast paths: full-model training, each trial merged by
    KnOTS's dense reference route, ΔW added to the weights. Its trials must agree with the engine's."""
    fast = run_examples(cfg_for(tiny_model_dir, dataset), tmp_path / "fast", console=QUIET)
    plain = run_examples(cfg_for(tiny_model_dir, dataset, engine="plain"), tmp_path / "plain", console=QUIET)
    assert plain["kept"] == fast["kept"]

    def trials(run):
        db = sqlite3.connect(tmp_path / run / "results.sqlite")
        return {(t, m): (p, c, json.loads(pr)) for t, m, p, c, pr in
                db.execute("SELECT target, trial, partners, correct, probs FROM trials")}

    a, b = trials("fast"), trials("plain")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2]
        assert max(abs(x - y) for x, y in zip(a[k][2], b[k][2])) < 1e-3, k


def test_study_runs_every_experiment_its_claims_need(tiny_model_dir, dataset, tmp_path):
    from mergeability.analysis.claims import EXPERIMENT_CLAIMS
    from mergeability.experiments.robustness import Robustness
    from mergeability.experiments.study import run_study, study_experiments
    from mergeability.report.build import build_report

    cfg = cfg_for(tiny_model_dir, dataset, partners=10)
    assert study_experiments(cfg, kept=200)[1] == Robustness((5, 25), scored=50)
    assert study_experiments(cfg, kept=20)[1] == Robustness((5,), scored=50)
    run = tmp_path / "run"
    run_study(cfg_for(tiny_model_dir, dataset), run, resume=False, console=QUIET)
    _, claims = build_report(run)
    by_text = {c.claim: c for c in claims}
    for key, (text, _) in EXPERIMENT_CLAIMS.items():  # every experiment claim was decided from rows
        assert "mergeability experiment" not in by_text[text].evidence, (key, by_text[text])
    store = Store(run / "results.sqlite")
    assert len(store.trial_keys()) == 4  # the run's own, N/2, TIES, mean
    store.close()


def test_locality_refuses_a_run_where_no_fixed_set_forms(tiny_model_dir, dataset, tmp_path, monkeypatch):
    from mergeability.experiments import locality, run_experiment

    run = tmp_path / "run"
    run_examples(cfg_for(tiny_model_dir, dataset), run, console=QUIET)
    monkeypatch.setattr(locality, "units", lambda cfg, sc, groups=None: [])  # e.g. every top update one subject
    with pytest.raises(MergeabilityError, match="too few kept updates of distinct subjects"):
        run_experiment("locality", run, QUIET)
    store = Store(run / "results.sqlite")
    assert store.experiment_rows("locality") == {}
    store.close()


def test_training_batches_group_passages_by_size_and_keep_run_order_within_a_size():
    from types import SimpleNamespace

    import torch

    from mergeability.pipelines.examples import training_batches

    lengths = {"a": [90], "b": [20], "c": [85], "d": [25], "e": [40, 40], "f": [88], "g": [22], "h": [20], "i": [30]}
    seqs = {k: [torch.zeros(1, n, dtype=torch.long) for n in v] for k, v in lengths.items()}
    prep = SimpleNamespace(sequences=seqs, engine=object(), cfg=SimpleNamespace(training=SimpleNamespace(batch=4)))
    batches, got = training_batches(prep, list(lengths))
    assert got == seqs
    assert batches == [["b", "h", "g", "d"], ["i", "c", "f", "a"], ["e"]]  # b before h: run order at equal size
    padded = lambda bs: sum(len(b) * max(sum(lengths[k]) for k in b) for b in bs)  # noqa: E731
    in_run_order = [["a", "b", "c", "d"], ["f", "g", "h", "i"], ["e"]]
    assert padded(batches) < padded(in_run_order)
    plain = SimpleNamespace(**{**vars(prep), "engine": None})  # the plain path trains one passage at a time
    assert [len(b) for b in training_batches(plain, list(lengths))[0]] == [1] * len(lengths)
