"""`mergeability compare`: two example-level runs side by side (paper A.2)."""

import csv
import sqlite3
from types import SimpleNamespace

import pytest
from rich.console import Console

from conftest import cfg_for, run_cli, task_cfg_for
from mergeability import MergeabilityError
from mergeability.config import save_config
from mergeability.pipelines import run_examples
from mergeability.report.compare import compare_runs, labels_for, shared_histogram
from mergeability.store import Store

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, dataset, tmp_path_factory):
    """Run "a" (M = 3, no leakage audit: as from a version before it) and run "b" (another seed, M = 2, an audit
    that found two leaking updates)."""
    root = tmp_path_factory.mktemp("runs")
    run_examples(cfg_for(tiny_model_dir, dataset), root / "a", console=QUIET)
    run_examples(cfg_for(tiny_model_dir, dataset, seed=1, trials=2), root / "b", console=QUIET)
    with sqlite3.connect(root / "a" / "results.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key = 'leakage'")
    store = Store(root / "b" / "results.sqlite")
    store.set_meta("leakage", {"leaking": 2, "audited": 9, "ids": ["f1", "f2"]})
    store.close()
    return root / "a", root / "b"


def scores_of(run_dir):
    with (run_dir / "scores.csv").open() as f:
        return [float(r["score"]) for r in csv.DictReader(f)]


def test_compare_writes_both_runs_side_by_side(two_runs, tmp_path, capsys):
    a, b = two_runs
    code, out, err = run_cli(["compare", a, b, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
    assert "Runs side by side" in out and "compare.html" in out
    html = (tmp_path / "cmp" / "compare.html").read_text()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "data:image/png;base64," in html and (tmp_path / "cmp" / "figures" / "scores.png").stat().st_size > 1000
    assert "Mergeability runs side by side: a vs b" in md and "| items screened | 20 | 20 |" in md
    assert "| leaking updates | — | 2 of 9 |" in md  # only b's store holds an audit
    assert "| merge | knots, M = 3, N = 2 | knots, M = 2, N = 2 |" in md
    # the runs' M differ, so the histogram uses 5 equal-width bins; each column counts every scored update once
    _, tables = compare_runs([a, b], tmp_path / "again")
    hist = tables[1]
    assert [r[0] for r in hist.rows] == ["[0.0, 0.2)", "[0.2, 0.4)", "[0.4, 0.6)", "[0.6, 0.8)", "[0.8, 1.0]"]
    for col, run in ((1, a), (2, b)):
        counts = [int(r[col].split()[0]) for r in hist.rows]
        s = scores_of(run)
        assert sum(counts) == len(s) and counts[4] == sum(x >= 0.8 for x in s)
    corr, claims = tables[2], tables[3]
    assert len(corr.rows) == 10 and all(r[1].count("p = ") == 1 for r in corr.rows)
    assert len(claims.rows) == 16 and claims.rows[0][0].startswith("Mergeability differs from the binomial baseline")
    assert all(c.split(":")[0] in ("supported", "contradicted", "inconclusive") for r in claims.rows for c in r[1:])


def test_same_m_bins_by_score_and_labels_stay_distinct(tmp_path):
    views = [SimpleNamespace(cfg=SimpleNamespace(merge=SimpleNamespace(trials=4)), scores=s)
             for s in ({"x": 0.0, "y": 1.0, "z": 1.0}, {"x": 0.25, "y": 0.5})]
    labels, counts = shared_histogram(views)
    assert labels == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert counts == [[1, 0, 0, 0, 2], [0, 1, 1, 0, 0]]
    assert labels_for([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == [
        str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run"), "z"]


def test_compare_bad_input(two_runs, tiny_model_dir, tmp_path, capsys):
    a, _ = two_runs
    with pytest.raises(MergeabilityError, match="two or more run directories"):
        compare_runs([a], tmp_path / "out")
    code, _, err = run_cli(["compare", a, tmp_path / "nowhere"], capsys)
    assert code == 2 and err.startswith("error:") and "nowhere' does not exist" in err and err.count("\n") == 1
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    save_config(task_cfg_for(tiny_model_dir, tmp_path / "pool"), tasks / "config.yaml")
    Store(tasks / "results.sqlite").close()
    with pytest.raises(MergeabilityError, match="is a tasks run: compare takes example-level runs"):
        compare_runs([a, tasks], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before every run was read
