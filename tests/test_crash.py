"""SIGKILL a real run at many points across training and trials; resuming must lose and duplicate nothing."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from mergeability import load_update


def _counts(db_path):
    if not db_path.exists():
        return (0, 0)
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
        n = tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("updates", "trials"))
        db.close()
        return n
    except sqlite3.Error:
        return (0, 0)


@pytest.mark.timeout(480)  # 14 runs of the CLI in subprocesses (~1 min on an idle 2-core machine)
def test_sigkill_at_many_points_then_resume_is_lossless(tiny_model_dir, dataset, tmp_path):
    args = ["run", "popqa", "--model", str(tiny_model_dir), "--dataset", str(dataset), "--items", "20",
            "--layer", "1", "--rank", "4", "--partners", "2", "--trials", "3", "--seed", "0"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.05\nalpha: 8\ntrain_batch: 2\nbatch_rows: 2\n")
    cmd = [sys.executable, "-m", "mergeability.cli", *args, "--config", str(cfg)]
    ref = tmp_path / "ref"
    subprocess.run([*cmd, "--out", str(ref)], check=True, capture_output=True, timeout=300)
    again = tmp_path / "again"  # determinism: the same command twice, byte-identical scores
    subprocess.run([*cmd, "--out", str(again)], check=True, capture_output=True, timeout=300)
    assert (again / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()

    out = tmp_path / "killed"
    db = out / "results.sqlite"
    kills = {"train": 0, "trials": 0}
    rng = random.Random(0)
    for _ in range(12):
        before = _counts(db)
        p = subprocess.Popen([*cmd, "--out", str(out), "--resume"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            # Up to 3 kills in training, then up to 3 in the trials, each a random few rows into the attempt.
            stage = "train" if kills["train"] < 3 else "trials" if kills["trials"] < 3 else None
            step = rng.randint(1, 3)
            target = (before[0] + step, 0) if stage == "train" else (before[0], before[1] + step)
            deadline = time.time() + 120
            while p.poll() is None and time.time() < deadline and stage is not None:
                now = _counts(db)
                if (stage == "train" and now[0] >= target[0]) or (stage == "trials" and now[1] >= target[1]):
                    break
                time.sleep(0.01)
            if p.poll() is not None or stage is None:
                _, err = p.communicate(timeout=300)
                assert p.returncode == 0, err.decode()
                break
        finally:  # a failed assertion or the test's timeout leaves no run behind
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        kills[stage] += 1
    assert kills == {"train": 3, "trials": 3}, kills
    assert (out / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM (SELECT 1 FROM trials GROUP BY target, trial, params "
                       "HAVING COUNT(*) > 1)").fetchone()[0] == 0
    for d in (out / "updates").iterdir():
        assert not d.name.startswith(".")  # no half-written adapter left behind
        assert load_update(d).modules
