import io
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from conftest import random_update, run_cli
from mergeability import load_update, merge, save_update

MOD = "model.layers.0.mlp.up_proj"


@pytest.fixture
def adapters(tmp_path):
    paths = []
    for i, r in enumerate([2, 3, 4]):
        u = random_update({MOD: (64, 32), "model.layers.1.self_attn.q_proj": (32, 32)}, r, seed=i,
                          dtype=torch.float32, base="tiny-llama")
        paths.append(save_update(u, tmp_path / f"a{i}"))
    return paths


@pytest.mark.parametrize("method, opts", [("mean", []), ("task_arithmetic", ["--lambda", "0.5"]),
                                          ("ties", ["--density", "0.3", "--per-module"]),
                                          ("knots", ["--weights", "1,2,1"])])
def test_merge_writes_adapter_whose_delta_is_the_merge(adapters, tmp_path, capsys, method, opts):
    code, out, err = run_cli(["merge", *adapters, "--method", method, "--out", tmp_path / "out", *opts], capsys)
    assert code == 0, err
    got = load_update(tmp_path / "out")
    params = {"--lambda": "lam", "--density": "density"}
    kw = {params[o]: float(v) for o, v in zip(opts, opts[1:]) if o in params}
    if "--per-module" in opts:
        kw["per_module"] = True
    weights = [1.0, 2.0, 1.0] if "--weights" in opts else None
    ref = merge([load_update(a) for a in adapters], method, weights, **kw)
    for n in ref.modules:
        torch.testing.assert_close(got.delta(n), ref.delta(n), rtol=1e-5, atol=1e-6)
    assert got.base_model == "tiny-llama"
    assert method in out


def test_base_accuracy_weights_option(adapters, tmp_path, capsys):
    code, _, err = run_cli(["merge", *adapters, "--method", "mean", "--base-accuracy", "0.1,0.9,0.5",
                            "--temperature", "0.5", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    w = load_update(tmp_path / "o").meta["merge"]["weights"]
    assert w[0] > w[2] > w[1] and abs(sum(w) - 1) < 1e-9


def _other_base(tmp_path):
    u = random_update({MOD: (64, 32)}, 2, dtype=torch.float32, base="another-model")
    return save_update(u, tmp_path / "other")


def _other_shape(tmp_path):
    u = random_update({MOD: (64, 16)}, 2, dtype=torch.float32, base="tiny-llama")
    return save_update(u, tmp_path / "shape")


def _nan(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_update(random_update({MOD: (64, 32)}, 2, dtype=torch.float32), tmp_path / "nan")
    st = load_file(d / "adapter_model.safetensors")
    next(iter(st.values()))[0, 0] = float("nan")
    save_file(st, d / "adapter_model.safetensors")
    return d


def _truncated(tmp_path):
    d = save_update(random_update({MOD: (64, 32)}, 2, dtype=torch.float32), tmp_path / "trunc")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return d


def _no_config(tmp_path):
    (tmp_path / "plain").mkdir()
    return tmp_path / "plain"


BAD = {
    "no adapter_config.json": (lambda a, t: [*a[:1], _no_config(t)], [], "no adapter_config.json"),
    "truncated safetensors": (lambda a, t: [a[0], _truncated(t)], [], "truncated"),
    "different base models": (lambda a, t: [a[0], _other_base(t)], [], "different base models"),
    "mismatched shapes": (lambda a, t: [a[0], _other_shape(t)], [], "shape"),
    "NaN weights": (lambda a, t: [a[0], _nan(t)], [], "NaN"),
    "one adapter": (lambda a, t: a[:1], [], "at least two"),
    "unknown method": (lambda a, t: a, ["--method", "soup"], "unknown merge method"),
    "weights count": (lambda a, t: a, ["--weights", "1,2"], "2 weights for 3"),
    "density 0": (lambda a, t: a, ["--method", "ties", "--density", "0"], "density"),
    "density > 1": (lambda a, t: a, ["--method", "knots", "--density", "1.5"], "density"),
    "bad weights": (lambda a, t: a, ["--weights", "1,x,2"], "comma-separated"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(adapters, tmp_path, capsys, case):
    make, opts, match = BAD[case]
    ins = make(adapters, tmp_path)
    out = tmp_path / "merged"
    code, _, err = run_cli(["merge", *ins, "--out", out, *opts], capsys)
    assert code == 2
    assert err.startswith("error:") and match in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_existing_output_needs_force(adapters, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(["merge", *adapters, "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["merge", *adapters, "--out", out], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["merge", *adapters[:2], "--out", out, "--force"], capsys)
    assert code == 0 and load_update(out).meta["merge"]["sources"] == [str(a) for a in adapters[:2]]
    (out / "keep").write_text("x")  # a directory with the user's own files is never replaced
    code, _, err = run_cli(["merge", *adapters, "--out", out, "--force"], capsys)
    assert code == 2 and "not an adapter this tool wrote" in err and (out / "keep").exists()


def test_console_script_prints_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "mergeability.cli"]
    r = subprocess.run([*exe, "merge", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    h = subprocess.run([*exe, "merge", "--help"], capture_output=True, text=True)
    assert h.returncode == 0
    for opt in ("--method", "--weights", "--density", "--lambda", "--per-module", "--seed", "--out", "--force"):
        assert opt in h.stdout


def test_a_plain_progress_stage_that_ends_below_its_bound_reports_what_was_done():
    from mergeability.console import progress

    buf = io.StringIO()
    with progress(Console(file=buf, width=200), interval=1e9) as bars:  # not a terminal: plain lines
        bar = bars.stage("fixes", 10)
        bar.advance(3)
        bar.finish()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("fixes      0/10 (0%)") and lines[-1].startswith("fixes      3/3 (100%)")
    assert len(lines) == 2  # the interval held back the advance's line; finishing prints one


def test_a_table_off_a_terminal_is_printed_whole():
    from mergeability.console import print_table

    buf = io.StringIO()
    name = "task004_country_region_" + "x" * 60  # wider than 80 columns with the other cells
    print_table(Console(file=buf, width=80), "t", ["adapter", "base", "alone"], [[name, "0.10", "0.65"]])
    assert name in buf.getvalue() and max(map(len, buf.getvalue().splitlines())) > 80
