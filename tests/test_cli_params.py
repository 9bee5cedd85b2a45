"""`mergeability merge --param KEY=VALUE`: a good value reaches the merge method's parameters (and the merged
adapter's provenance); a bad key, a bad value or a missing '=' is a one-line error with exit status 2."""

import dataclasses

import pytest
import torch

from conftest import random_update, run_cli
from mergeability import load_update, merge, save_update
from mergeability.adapters import method_params_help, parse_params
from mergeability.errors import MergeabilityError
from mergeability.merging import METHODS, get_method

MOD = "model.layers.0.mlp.up_proj"


@pytest.fixture
def adapters(tmp_path):
    return [save_update(random_update({MOD: (24, 16)}, r, seed=i, dtype=torch.float32, base="tiny-llama"),
                        tmp_path / f"a{i}") for i, r in enumerate([2, 3, 4])]


@pytest.mark.parametrize("method, params, expected", [
    ("ties", ["density=0.5", "per_module=true", "seed=3", "dare=null"],
     dict(density=0.5, per_module=True, seed=3, dare=None)),
    ("ties", ["density=1"], dict(density=1.0)),  # an integer is a number
    ("knots", ["inner=mean", "density=0.4", "rtol=1e-6"], dict(inner="mean", density=0.4, rtol=1e-6)),  # 1e-6: text
    ("task_arithmetic", ["lam=0.25"], dict(lam=0.25)),
    ("ties", ["dare=0.3", "seed=7"], dict(dare=0.3, seed=7)),
])
def test_param_reaches_the_method(adapters, tmp_path, capsys, method, params, expected):
    out = tmp_path / "out"
    args = [a for p in params for a in ("--param", p)]
    code, stdout, err = run_cli(["merge", *adapters, "--method", method, "--out", out, *args], capsys)
    assert code == 0, err
    got = load_update(out)
    want = dataclasses.asdict(get_method(method, **expected))
    assert got.meta["merge"]["params"] == want
    for k, v in expected.items():  # the types too: 1 arrives as 1.0, true as True, null as None
        assert type(got.meta["merge"]["params"][k]) is type(v)
    ref = merge([load_update(a) for a in adapters], method, None, **expected)
    torch.testing.assert_close(got.delta(MOD), ref.delta(MOD), rtol=1e-5, atol=1e-6)


def test_param_overrides_its_shortcut(adapters, tmp_path, capsys):
    code, _, err = run_cli(["merge", *adapters, "--method", "ties", "--density", "0.3", "-p", "density=0.6",
                            "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert load_update(tmp_path / "o").meta["merge"]["params"]["density"] == 0.6


BAD = {
    "missing '='": ("ties", "density", "KEY=VALUE"),
    "empty key": ("ties", "=0.3", "KEY=VALUE"),
    "unknown key": ("ties", "bogus=1", "ties takes no parameter bogus"),
    "key of another method": ("mean", "density=0.3", "mean takes no parameter density"),
    "unreadable value": ("ties", "density=[1", "cannot read the value"),
    "text for a number": ("ties", "density=abc", "density takes a number"),
    "not a bool": ("ties", "per_module=maybe", "per_module takes true or false"),
    "not an integer": ("ties", "seed=1.5", "seed takes an integer"),
    "bool for an integer": ("knots", "seed=true", "seed takes an integer"),
    "not a choice": ("knots", "inner=soup", "inner takes 'ties' or 'mean'"),
    "out of range": ("ties", "density=2", "density must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_param_one_line_exit_2(adapters, tmp_path, capsys, case):
    method, param, match = BAD[case]
    out = tmp_path / "merged"
    code, _, err = run_cli(["merge", *adapters, "--method", method, "--param", param, "--out", out], capsys)
    assert code == 2, err
    assert err.startswith("error:") and match in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists()


def test_parse_params_types_without_the_cli():
    assert parse_params("ties", ["density=1", "dare=0.5"]) == {"density": 1.0, "dare": 0.5}
    assert parse_params("knots", []) == {}
    with pytest.raises(MergeabilityError, match="lam takes a number"):
        parse_params("task_arithmetic", ["lam=yes"])  # YAML 1.1 reads yes as true: a bool is not a number


def test_help_lists_every_parameter_with_its_default():
    text = method_params_help()
    for name, cls in METHODS.items():
        assert f"{name}:" in text
        for f in dataclasses.fields(cls):
            assert f"{f.name}={f.default}" in text
