"""The command line as a shell sees it: --help and input errors start without torch; usage errors and OSErrors are
one `error:` line with exit 2; an interrupt, while the package is still loading or deep in a command, is one line
and exit 130; --help shows the value each flag takes from the config when it is not given."""

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer

from conftest import run_cli
from mergeability import cli, config

SRC = Path(__file__).resolve().parent.parent / "src"
TIMEOUT = 60  # seconds any one child process may take


def child_env(*path: Path, **extra: str) -> dict:
    """The environment of a child `python -m mergeability`: this checkout first on the path, no proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=os.pathsep.join(map(str, [*path, SRC])), OMP_WAIT_POLICY="PASSIVE", COLUMNS="200", **extra)
    return env


def start(args: list[str], env: dict) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
    # (`make test &`, some CI runners) ignores SIGINT, children inherit that, and Python then keeps ignoring it
    return subprocess.Popen([sys.executable, "-m", "mergeability", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err and "╭" not in out + err, out + err  # no traceback, no rich box
    return err


# ------------------------------------------------------------------------------------------------- start time


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["run", "popqa", "--help"], 0),
                                        (["run", "tasks", "--help"], 0), (["report", "/no/such/dir"], 2),
                                        (["run", "popqa", "--items", "ten"], 2)])
def test_help_and_input_errors_never_load_torch(args, code):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mergeability", *args], env=child_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == code, r.stderr[-2000:]
    loaded = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "typer" in loaded  # the import log is there to read
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "matplotlib")]


def test_package_names_load_on_first_use():
    code = ("import sys, mergeability as m\n"
            "assert 'torch' not in sys.modules, 'import mergeability loaded torch'\n"
            "assert set(m.__all__) <= set(dir(m))\n"
            "from mergeability import *\n"
            "assert merge is m.merge and get_method('mean') and LowRank and isinstance(__version__, str)\n"
            "assert 'torch' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------- one error path


@pytest.mark.parametrize("args, message, command", [
    (["run", "popqa", "--itemz", "3"], "No such option: --itemz", "mergeability run popqa"),
    (["run", "popqa", "--items", "ten"], "Invalid value for '--items'", "mergeability run popqa"),
    (["run", "tasks", "--threshold"], "Option '--threshold' requires an argument", None),  # click names no command
    (["report"], "Missing argument", "mergeability report"),
    (["report", "/no/such/dir"], "/no/such/dir", "mergeability report"),
    (["compare", "/no/such/dir", "/no/such/dir2"], "does not exist", "mergeability compare"),
    (["bogus"], "No such command 'bogus'", "mergeability"),
])
def test_usage_error_is_one_line_exit_2(capsys, args, message, command):
    err = one_error_line(*run_cli(args, capsys))
    assert message in err and (command is None or f"(try '{command} --help')" in err), err


def test_help_exits_0_and_a_bare_group_shows_its_help(capsys):
    code, out, _ = run_cli(["run", "popqa", "--help"], capsys)
    assert code == 0 and "--items" in out
    code, out, err = run_cli(["run"], capsys)
    assert code == 2 and "popqa" in out and err == ""


@pytest.mark.parametrize("raised, line", [
    (PermissionError(13, "Permission denied", "/runs/x/report.html"), "error: Permission denied: /runs/x/report.html"),
    (NotADirectoryError(20, "Not a directory", "/runs/file/figures"), "error: Not a directory: /runs/file/figures"),
    (OSError(28, "No space left on device"), "error: No space left on device"),
    (OSError("a library's own words\nand more"), "error: a library's own words"),  # no strerror: its first line
])
def test_os_error_anywhere_is_one_line(monkeypatch, capsys, tmp_path, raised, line):
    def build_report(run_dir):
        raise raised

    monkeypatch.setattr("mergeability.report.build.build_report", build_report)
    err = one_error_line(*run_cli(["report", tmp_path], capsys))
    assert err == line + "\n"


def test_interrupt_in_a_command_and_a_bug(monkeypatch, capsys, tmp_path):
    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr("mergeability.report.build.build_report", interrupted)
    assert run_cli(["report", tmp_path], capsys) == (130, "", "interrupted\n")

    def bug(run_dir):
        raise RuntimeError("a bug")

    monkeypatch.setattr("mergeability.report.build.build_report", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not bad input: its traceback stays
        run_cli(["report", tmp_path], capsys)


# ------------------------------------------------------------------------------------------ Ctrl-C, for real


def wait_for_line(stream, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    assert sel.select(timeout), "the child printed nothing in time"
    return stream.readline()


def assert_interrupted(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 130, (out, err)
    assert err == "interrupted\n" and "Traceback" not in out, (out, err)


def test_interrupt_while_the_package_loads(tmp_path):
    # A stand-in for typer, which only the command line loads, holds the child inside that import until the signal.
    (tmp_path / "typer").mkdir()
    (tmp_path / "typer" / "__init__.py").write_text(
        "import sys, time\nsys.stderr.write('loading\\n')\nsys.stderr.flush()\ntime.sleep(60)\n")
    p = start(["run", "popqa", "--help"], child_env(tmp_path))
    try:
        assert wait_for_line(p.stderr, TIMEOUT) == "loading\n"
        assert_interrupted(p)
    finally:
        p.kill()


def test_interrupt_while_a_command_waits(tmp_path):
    # The run's first download asks a package index that never answers: the child waits inside the command.
    index = socket.create_server(("127.0.0.1", 0))
    index.settimeout(TIMEOUT)
    env = child_env(MERGEABILITY_INDEX=f"http://127.0.0.1:{index.getsockname()[1]}/simple",
                    MERGEABILITY_CACHE=str(tmp_path / "cache"), NO_PROXY="127.0.0.1")
    p = start(["run", "popqa", "--dataset", "wikidata", "--model", "gemma3-270m", "--out", str(tmp_path / "run")], env)
    try:
        try:
            conn, _ = index.accept()  # the child is now in the middle of the run, waiting for an answer
        except TimeoutError:
            p.kill()
            pytest.fail(f"the run never asked the index: {p.communicate()}")
        assert_interrupted(p)
        conn.close()
    finally:
        p.kill()
        index.close()


# --------------------------------------------------------------------------------------- defaults in --help


def shown_defaults() -> dict[str, dict[str, str]]:
    shown = {}
    for name in ("popqa", "tasks"):
        command = typer.main.get_command(cli.app)
        cli.show_config_defaults(command, ["run", name, "--help"])
        shown[name] = {p.name: p.show_default for p in command.commands["run"].commands[name].params}
    return shown


def test_help_shows_the_config_value_of_every_flag_it_supplies():
    shown = shown_defaults()
    examples, tasks = config.ExampleConfig(), config.TaskConfig()
    for name in ("popqa", "tasks"):
        for flag, value in shown[name].items():
            if flag in config.FLAT and flag not in ("config", "preset"):
                assert isinstance(value, str) and not isinstance(value, cli.FromConfig), (name, flag, value)
    assert shown["popqa"]["items"] == str(examples.data.items)
    assert shown["popqa"]["partners"] == str(examples.merge.partners)
    assert shown["popqa"]["rank"] == str(examples.training.rank)
    assert shown["popqa"]["dtype"] == examples.model.dtype
    assert shown["popqa"]["layer"] == "the middle one"
    assert shown["tasks"]["partners"] == str(tasks.merge.partners)
    assert shown["tasks"]["rank"] == str(tasks.training.rank)
    assert config.TASK_PRESETS[cli.TASKS_PRESET]["data"]["threshold"] == tasks.data.threshold
    assert shown["tasks"]["threshold"] == str(tasks.data.threshold)  # the preset agrees with the default: once


def test_help_names_both_values_where_the_tasks_preset_differs(monkeypatch):
    preset = {**config.TASK_PRESETS[cli.TASKS_PRESET]}
    preset["data"] = {**preset["data"], "threshold": 0.5}
    monkeypatch.setitem(config.TASK_PRESETS, cli.TASKS_PRESET, preset)
    assert shown_defaults()["tasks"]["threshold"].startswith(f"0.5; {config.TaskConfig().data.threshold} with ")


def test_rendered_help_has_each_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run_cli(["run", "popqa", "--help"], capsys)
    for flag, value in (("--items", config.ExampleConfig().data.items), ("--trials", config.MergeConfig().trials)):
        assert re.search(rf"{flag} .*\[default: \({value}\)\]", out), out


@pytest.mark.parametrize("flag, section, field", [("dtype", config.ModelConfig, "dtype"),
                                                   ("backend", config.BackendConfig, "name"),
                                                   ("update", config.ItemTraining, "update"),
                                                   ("engine", config.ExampleConfig, "engine")])
def test_help_lists_every_choice_the_config_takes(flag, section, field):
    tp = typing.get_type_hints(section)[field]
    assert typing.get_origin(tp) is typing.Literal
    command = typer.main.get_command(cli.app).commands["run"].commands["popqa"]
    help_text = next(p.help for p in command.params if p.name == flag)
    listed = re.findall(r"\w+", help_text.split(":")[-1] if flag == "backend" else help_text.split(":")[0])
    assert set(typing.get_args(tp)) <= set(listed), (help_text, typing.get_args(tp))
