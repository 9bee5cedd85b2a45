"""The `mergeability` command. Thin: each subcommand parses, calls library functions, and prints.

Only typer, rich and the error type load with this module: each command imports the library it runs (the config,
torch and the rest: seconds) in its body, so that `--help` and usage errors answer at once. `main` is the one error
path.
"""

from __future__ import annotations

import os
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand

from mergeability.console import print_table, progress
from mergeability.errors import MergeabilityError, one_line

try:  # recent typer runs on its own copy of click (typer._click), earlier versions on click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:
    from click.exceptions import ClickException, UsageError

app = typer.Typer(
    help="Measure, explain and exploit how well model updates (LoRA adapters, task vectors) survive merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

# ----------------------------------------------------------------------------------- defaults that --help shows
# A run's flags default to None ("not given") so that a --config file can supply the value. Their help shows the
# value a run takes then, read from the config classes (and the preset a kind of run falls back to), so that it
# cannot drift from the config. The config loads pydantic (a third of a second), so it is read only when help is
# asked for (`invoke`). typer shows a described default in parentheses: [default: (200)].

EXAMPLES, TASKS = "examples", "tasks"
COMMAND = {EXAMPLES: "run popqa", TASKS: "run tasks"}
TASKS_PRESET = "bundled"  # what `run tasks` runs without --preset, --config, or a --pool other than bundled
NONE_MEANS = {  # what None means for the flags whose config default is None
    "passages": "the dataset's own", "relations": "all", "layer": "the middle one", "tasks": "all",
    "max_test": "all", "max_tasks": "no cap", "ray_address": "start a local one", "workers": "one per GPU, or per CPU",
}
RUNS_OWN = "the run's own"  # flags of commands on an existing run: its config.yaml supplies what they leave out


class FromConfig(str):
    """The shown default of a flag that the config of `kinds` of run supplies, until `show_config_defaults` reads
    the value (a str: typer shows it as it is if nothing replaces it)."""

    kinds: tuple[str, ...]

    def __new__(cls, *kinds: str) -> FromConfig:
        self = super().__new__(cls, "from the config")
        self.kinds = kinds or (EXAMPLES, TASKS)
        return self


def configured(help: str, *kinds: str):
    """A flag whose value comes from the config of `kinds` of run (default: both) when it is not given."""
    return typer.Option(help=help, show_default=FromConfig(*kinds))


def show_config_defaults(group, args: list[str]) -> None:
    """Replace each FromConfig default of the command that `args` name under `group` by the config's value."""
    command = group
    for arg in args:  # `run popqa --help`: the command is the one its leading words name
        if arg not in getattr(command, "commands", {}):
            break
        command = command.commands[arg]
    for p in command.params:
        if isinstance(p.show_default, FromConfig):
            p.show_default = default_of(p.name, p.show_default.kinds)


def default_of(name: str, kinds: tuple[str, ...]) -> str:
    """Flag `name`'s value when no file or flag sets it, in words; each kind's where the kinds of run differ."""
    from mergeability.config import FLAT, KINDS, TASK_PRESETS  # deferred for start time: loads pydantic

    section, key = FLAT[name]
    shown = {}
    for kind in kinds:
        cfg = KINDS[kind]()
        holder = cfg if section is None else getattr(cfg, section)
        if not hasattr(holder, key):
            continue
        shown[kind] = _words(name, getattr(holder, key))
        preset = TASK_PRESETS[TASKS_PRESET] if kind == TASKS else {}
        layer = preset if section is None else preset.get(section, {})
        if key in layer and _words(name, layer[key]) != shown[kind]:
            shown[kind] = f"{_words(name, layer[key])}; {shown[kind]} with another --pool or a --config"
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return " | ".join(f"{text} ({COMMAND[kind]})" for kind, text in shown.items())


def _words(name: str, value) -> str:
    if value is None:
        return NONE_MEANS.get(name, "none")
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# Options several commands share. The choices in --dtype, --backend, --update and --engine are the config's
# (tests/test_cli_shell.py checks them against its Literal annotations).
Device = Annotated[Optional[str], configured("cpu | cuda | cuda:N.")]
Dtype = Annotated[Optional[str], configured("float32 | float64 | bfloat16 | float16.")]
Seed = Annotated[Optional[int], configured("Run seed.")]
Backend = Annotated[Optional[str], configured("Where jobs run: local | processes (forked workers, Linux CPU) | ray.")]
RayAddress = Annotated[Optional[str], configured("Ray cluster to join.")]
Workers = Annotated[Optional[int], configured("Worker processes or Ray actors (default: one per core, or per GPU).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out, skipping recorded work.")]
Config = Annotated[Optional[Path], typer.Option(help="YAML config file; flags override it.")]
Method = Annotated[Optional[str], configured("Merge method: knots | ties | mean | task_arithmetic.")]
Trials = Annotated[Optional[int], configured("M: trials per update.")]
Partners = Annotated[Optional[int], configured("N: partners merged with the update per trial.", EXAMPLES)]
Model = Annotated[Optional[str], configured(
    "Hub id, local directory, or a built-in model: smollm2-135m (bundled) | gemma3-270m (fetched on first use).")]


PARAM_HELP = "A method parameter KEY=VALUE (repeatable)."
WEIGHTS_HELP = ("Per-adapter weights, comma-separated (e.g. 1,2,1), or base-accuracy: softmax((1-acc)/T) with acc "
                "the base model's accuracy on each adapter's --eval set (paper §6).")
EVAL_HELP = ("A task split file (.jsonl/.parquet with input, output) per adapter, in adapter order: report base, "
             "fine-tuned and merged exact-match accuracy on each.")


class MergeCommand(TyperCommand):
    """`merge`: its --param help lists every method's parameters, read from the merge methods, which load torch
    (seconds); so that help is written when it is shown, not when the command line is read."""

    def format_help(self, ctx, formatter) -> None:
        from mergeability.adapters import method_params_help  # deferred: loads torch

        for p in self.params:
            if p.name == "param":
                p.help = f"{PARAM_HELP} {method_params_help()}."
        super().format_help(ctx, formatter)


@app.command(cls=MergeCommand)
def merge(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter directories to merge (two or more).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT adapter directory (must not exist).")],
    method: Annotated[str, typer.Option(help="mean | task_arithmetic | ties | knots")] = "knots",
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    weights: Annotated[Optional[str], typer.Option(help=WEIGHTS_HELP)] = None,
    eval_sets: Annotated[Optional[list[Path]], typer.Option("--eval", help=EVAL_HELP)] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model for --eval (default: the adapters' base model).")] = None,
    base_accuracy: Annotated[Optional[str], typer.Option(
        help="Per-adapter base-model accuracies in [0,1]; weights become softmax((1-acc)/T) (paper §6).")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="T of the base-accuracy weights (only with them).", show_default="1.0")] = None,
    density: Annotated[Optional[float], typer.Option(help="Shortcut for --param density=…")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Shortcut for --param lam=…")] = None,
    per_module: Annotated[bool, typer.Option("--per-module", help="Shortcut for --param per_module=true")] = False,
    dare: Annotated[Optional[float], typer.Option(help="Shortcut for --param dare=…")] = None,
    inner: Annotated[Optional[str], typer.Option(help="Shortcut for --param inner=…")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Shortcut for --param seed=…")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it is an adapter this tool wrote (never an input, a file or other files).")
    ] = False,
) -> None:
    """Merge LoRA adapters into one PEFT adapter directory whose ΔW is the merge."""
    from mergeability.adapters import (  # deferred for start time: these load torch (seconds)
        EvalSets,
        check_merge_request,
        floats,
        load_adapters,
        merge_adapters,
        merge_weights,
        parse_params,
    )
    from mergeability.merging import get_method

    shortcuts = {"density": density, "lam": lam, "dare": dare, "inner": inner, "seed": seed,
                 "per_module": True if per_module else None}
    params = {**{k: v for k, v in shortcuts.items() if v is not None}, **parse_params(method, param or [])}
    merger = get_method(method, **params)  # validates method and parameter names first: fail before any I/O
    if weights is not None and weights.strip().lower().replace("_", "-") == "base-accuracy":
        weights = "base-accuracy"
    check_merge_request(adapters, out, force, weights, base_accuracy, eval_sets, temperature, params, seed is not None)
    if weights not in (None, "base-accuracy"):
        floats(weights, "--weights")
    updates = load_adapters(adapters)
    evals = EvalSets.build(adapters, updates, eval_sets, model) if eval_sets else None
    w = merge_weights(len(updates), weights, base_accuracy, temperature, evals)
    t0 = time.perf_counter()
    merged = merge_adapters(adapters, out, merger, w, updates=updates, force=force,
                            meta={"base_accuracy": evals.base_acc} if evals else None)
    elapsed = time.perf_counter() - t0
    if evals is not None:
        print_table(console, "exact-match accuracy on each adapter's --eval set",
                    ["adapter", "weight", "base", "fine-tuned", "merged"], evals.rows(updates, merged, w))
    rows = [[name, type(m).__name__, str(m.rank) if type(m).__name__ == "LowRank" else "full", f"{m.fro_norm():.4g}",
             f"{m.singular_values()[0].item():.4g}"] for name, m in merged.modules.items()]
    print_table(console, f"{method} merge of {len(updates)} adapters → {out}",
                ["module", "kind", "rank", "‖ΔW‖_F", "σ_max"], rows)
    console.print(f"merged in {elapsed * 1000:.1f} ms; weights {[f'{x:.3g}' for x in (w or [1.0] * len(updates))]}")


PLAN_EVAL_HELP = ("One eval file per adapter, in adapter order: a task file (.jsonl/.parquet with input, output; "
                  "exact match) or a PopQA-schema fact file (multiple choice). Each is split into a validation and a "
                  "held-out half.")


@app.command(cls=MergeCommand)
def plan(
    adapters: Annotated[list[Path], typer.Argument(
        help="PEFT LoRA adapter directories you mean to merge (two or more).")],
    eval_sets: Annotated[Optional[list[Path]], typer.Option("--eval", help=PLAN_EVAL_HELP)] = None,
    method: Annotated[Optional[str], typer.Option(
        help="mean | task_arithmetic | ties | knots", show_default="knots")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help=PARAM_HELP)] = None,
    predictor: Annotated[Optional[Path], typer.Option(
        help="A run directory where `mergeability predict` saved a predictor: show its predicted score.")] = None,
    max_rank: Annotated[Optional[int], typer.Option(
        help="Truncate every merge to this rank before evaluating and writing it.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the recommended merge (the plain one when nothing needs fixing) here.")] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Write everything the plan measured and decided here (JSON).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the adapters' base model).")] = None,
    max_test: Annotated[Optional[int], typer.Option(
        help="Use at most this many rows of each eval file (a seeded sample).", show_default="all")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample, the halves and the multiple-choice options.")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace --out if it is an adapter this tool wrote (never an input, a file or other files).")
    ] = False,
) -> None:
    """Will my merge work, and how do I fix it: base, alone and merged accuracy per adapter on held-out halves, the
    features behind a prediction, and verified fixes when an adapter does not survive."""
    from mergeability.planning import PlanRequest, make_plan, notes, tables, verdict, write_outputs  # loads torch

    req = PlanRequest(tuple(adapters), tuple(eval_sets or ()), method, tuple(param or ()), predictor, max_rank, out,
                      json_path, model, max_test, seed, force)
    with progress(console) as bars:
        result = make_plan(req, bars)
    for title, columns, rows in tables(result):
        print_table(console, title, columns, rows)
    for line in [*notes(result), verdict(result)]:  # whole lines, however long: a log keeps them greppable
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for path in write_outputs(result):
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


run_app = typer.Typer(help="End-to-end mergeability runs.", no_args_is_help=True)
app.add_typer(run_app, name="run")


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@run_app.command("popqa")
def run_popqa_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/popqa"),
    config: Config = None,
    preset: Annotated[Optional[str], typer.Option(
        help="demo | study (then the experiments its claims need, and the report) | paper-llama | paper-qwen")] = None,
    model: Model = None,
    dataset: Annotated[Optional[str], configured(
        "geo | wikidata (BIG-bench's Wikidata facts) | popqa | PATH (.tsv/.jsonl/.parquet).", EXAMPLES)] = None,
    passages: Annotated[Optional[str], configured(
        "Training text where the dataset has no passage column: PATH (.jsonl/.parquet/.tsv of subj, passage) | "
        "wikipedia (each subject's page, fetched and cached).", EXAMPLES)] = None,
    relations: Annotated[Optional[str], configured("Comma-separated relations to keep.", EXAMPLES)] = None,
    items: Annotated[Optional[int], configured("Questions screened by the base model.", EXAMPLES)] = None,
    per_subject: Annotated[Optional[int], configured(
        "At most this many questions per subject, across relations (PopQA asks one).", EXAMPLES)] = None,
    trials: Trials = None,
    partners: Partners = None,
    method: Method = None,
    layer: Annotated[Optional[int], configured("Decoder layer to adapt.", EXAMPLES)] = None,
    rank: Annotated[Optional[int], configured("LoRA rank.", EXAMPLES)] = None,
    update: Annotated[Optional[str], configured(
        "lora | full: full is a dense ΔW of the target modules (A.8).", EXAMPLES)] = None,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
    engine: Annotated[Optional[str], configured(
        "fast | plain: plain is the obvious path, for checking.", EXAMPLES)] = None,
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
    resume: Resume = False,
) -> None:
    """Example-level mergeability on PopQA-schema data (paper §2, §3.1): screen, train one LoRA per wrong item,
    score by merging."""
    from mergeability.config import load_config, override  # deferred for start time, as below: loads pydantic

    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    cfg = override(load_config(config, preset), model=model, dataset=dataset, passages=passages, items=items,
                   per_subject=per_subject, trials=trials, partners=partners, method=method, layer=layer, rank=rank,
                   update=update, device=device, dtype=dtype, seed=seed, engine=engine, backend=backend,
                   ray_address=ray_address, workers=workers, relations=_split(relations))
    # deferred for start time: the pipelines load torch (seconds), which --help and usage errors do not need
    from mergeability.experiments.study import run_study
    from mergeability.pipelines import run_examples
    from mergeability.report.build import build_report

    if preset == "study":
        run_study(cfg, out, resume=resume, console=console)
        html_path, _ = build_report(out)
        console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")
        return
    run_examples(cfg, out, resume=resume, console=console)
    console.print(f"wrote {out / 'scores.csv'} and {out / 'results.sqlite'}")


@run_app.command("tasks")
def run_tasks_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/tasks"),
    config: Config = None,
    preset: Annotated[Optional[str], typer.Option(
        help=f"{TASKS_PRESET} (default without --config, and with no --pool or --pool bundled) | "
             "lots-of-loras")] = None,
    pool: Annotated[Optional[str], configured(
        "bundled | hub (Lots-of-LoRAs) | natural-instructions | a local pool directory.", TASKS)] = None,
    tasks: Annotated[Optional[str], configured("Comma-separated task names or numbers.", TASKS)] = None,
    max_tasks: Annotated[Optional[int], configured(
        "Take at most the first N tasks by number (--pool hub needs this or --tasks).", TASKS)] = None,
    train_missing: Annotated[Optional[bool], typer.Option(
        "--train-missing/--skip-missing", help="--pool hub: train adapters for the datasets that have none, or "
        "skip them with a note.", show_default=FromConfig(TASKS))] = None,
    model: Model = None,
    threshold: Annotated[Optional[float], configured("Keep tasks with fine-tuned accuracy ≥ this.", TASKS)] = None,
    trials: Trials = None,
    partners: Annotated[Optional[int], configured("N: partners merged with the task per trial.", TASKS)] = None,
    method: Method = None,
    rank: Annotated[Optional[int], configured("LoRA rank of trained task adapters.", TASKS)] = None,
    max_test: Annotated[Optional[int], configured(
        "Evaluate at most this many test examples per task.", TASKS)] = None,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
    resume: Resume = False,
) -> None:
    """Task-level mergeability (paper §3.2): base and fine-tuned accuracy per task, threshold, score by merging."""
    from mergeability.config import load_config, override  # deferred for start time, as below: loads pydantic

    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    if preset is None and config is None and pool in (None, "bundled"):
        preset = TASKS_PRESET
    cfg = override(load_config(config, preset, kind="tasks"), pool=pool, model=model, threshold=threshold,
                   trials=trials, partners=partners, method=method, rank=rank, max_test=max_test, device=device,
                   dtype=dtype, seed=seed, backend=backend, ray_address=ray_address, workers=workers,
                   tasks=_split(tasks), max_tasks=max_tasks, train_missing=train_missing)
    # deferred for start time: the pipelines load torch (seconds), which --help and usage errors do not need
    from mergeability.pipelines import run_tasks
    from mergeability.report.build import build_report

    run_tasks(cfg, out, resume=resume, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it exists).")] = Path("runs/demo"),
) -> None:
    """The paper's main experiment on the bundled model and the bundled geo dataset, sized for a laptop CPU."""
    from mergeability.config import load_config  # deferred for start time: the config loads pydantic,
    from mergeability.pipelines import run_examples  # the pipelines torch
    from mergeability.report.build import build_report
    from mergeability.run import check_new  # deferred for start time, like the other commands' library imports

    cfg = load_config(None, "demo")
    check_new(out, True, cfg, same_config=True)  # resumes only its own run: never takes over another directory
    run_examples(cfg, out, resume=True, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="algorithms | robustness | locality | groups | knots-settings "
                                             "(example level); weighted (task level)")],
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.", exists=True, file_okay=False)],
    sets: Annotated[int, typer.Option(
        help="weighted: distinct task sets (all of them when there are fewer; else a seeded sample).")] = 40,
    low: Annotated[int, typer.Option(help="weighted: weak tasks per set (base ≤ 0.1, fine-tuned ≥ threshold).")] = 2,
    high: Annotated[int, typer.Option(
        help="weighted: strong tasks per set (base ≥ 0.8 and above the majority rate, fine-tuned ≥ threshold).")] = 2,
    temperature: Annotated[float, typer.Option(help="weighted: T of softmax((1 - acc)/T) for every method.")] = 0.5,
    sweep: Annotated[str, typer.Option(help="weighted: other T values, tried with the mean merge.")] = "0.1,0.25,1,2",
    methods: Annotated[str, typer.Option(help="weighted: merge methods to weight.")] = "mean,ties,knots",
    backend: Annotated[Optional[str], typer.Option(
        help="Where jobs run: local | processes (forked workers, Linux CPU) | ray.", show_default=RUNS_OWN)] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to join.", show_default=RUNS_OWN)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes or Ray actors.",
                                                   show_default=RUNS_OWN)] = None,
) -> None:
    """Run one of the paper's follow-up experiments on a run's updates (resumable), then refresh its report."""
    # deferred for start time: the experiments load torch (seconds), which --help and usage errors do not need
    from mergeability.adapters import floats
    from mergeability.experiments import get_experiment, run_experiment
    from mergeability.report.build import build_report

    params = {}
    if name == "weighted":
        params = dict(sets=sets, low=low, high=high, temperature=temperature, sweep=tuple(floats(sweep, "--sweep")),
                      methods=tuple(_split(methods) or ()))
    exp = get_experiment(name, **params)
    overrides = {k: v for k, v in dict(backend=backend, ray_address=ray_address, workers=workers).items()
                 if v is not None}
    run_experiment(exp, run_dir, console, overrides)
    html_path, _ = build_report(run_dir)
    console.print(f"experiment {name} recorded in {run_dir / 'results.sqlite'}; report refreshed: {html_path}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (example or task level).", exists=True,
                                            file_okay=False)],
    folds: Annotated[int, typer.Option(help="Grouped cross-validation folds (fewer when there are fewer "
                                            "relations / task families).")] = 5,
    density: Annotated[float, typer.Option(help="TIES trim of the sign-conflict feature.")] = 0.2,
    prompts: Annotated[int, typer.Option(help="Task level: test prompts per task for the hidden-shift "
                                              "feature.")] = 8,
) -> None:
    """Predict each update's score from features that need no merge trial, cross-validated by relation (example
    level) or task family (task level), against every single-feature baseline and a one-merge proxy. Writes
    predict.json, features.csv and predictor.joblib (for `plan --predictor`), then refreshes the report."""
    # deferred for start time: scikit-learn and torch
    from mergeability.prediction import LABELS, Predict, predict_run
    from mergeability.report.build import build_report

    result = predict_run(run_dir, console, spec=Predict(n_splits=folds, density=density, prompts=prompts))
    num = lambda x: "—" if x is None else f"{x:+.2f}"  # noqa: E731  (None: not defined, e.g. no lost update)
    rows = [[LABELS.get(e["name"], e["name"]), num(e["rho"]), f"[{num(e['ci'][0])}, {num(e['ci'][1])}]",
             num(e["auc_lost"])] for e in result["evaluations"]]
    print_table(console, f"grouped CV, {result['n']} updates in {result['groups']} groups",
                ["predictor", "ρ", "95% CI", "AUC lost"], rows)
    c = result["costs"]
    proxy = ("not timed (resumed from an earlier predict)" if c["proxy_share"] is None
             else f"{100 * c['proxy_share']:.0f} %")
    console.print(f"best: {result['best']}; no-merge features took {100 * c['no_merge_share']:.0f} % of the "
                  f"trials' time, the proxy {proxy}")
    html_path, _ = build_report(run_dir)
    console.print(f"predictor saved in {run_dir / 'predictor.joblib'}; report refreshed: {html_path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(
        help="A finished (or partly finished) run directory.", exists=True, file_okay=False)]) -> None:
    """Write report.html (self-contained) and report.md with figures, tables and the claims table."""
    from mergeability.report.build import build_report  # deferred for start time: the report loads torch

    html_path, claims = build_report(run_dir)
    print_table(console, "claims", ["claim", "measured", "verdict"], [[c.claim, c.measured, c.verdict] for c in claims])
    console.print(f"wrote {html_path} and {html_path.with_suffix('.md')}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Two or more example-level run directories.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where compare.html and compare.md go.")] = Path(
        "runs/compare"),
) -> None:
    """Runs side by side (paper A.2, Llama vs Qwen): a column per run, score histograms on shared bins, each run's
    correlations and claims."""
    from mergeability.report.compare import compare_runs  # deferred for start time: the report loads torch

    html_path, tables = compare_runs(run_dirs, out)
    print_table(console, tables[0].title, tables[0].columns, tables[0].rows)
    console.print(f"wrote {html_path} and {html_path.with_suffix('.md')}")


tasks_app = typer.Typer(help="Facts about task pools, for choosing tasks before a task-level run.",
                        no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("survey")
def tasks_survey_cmd(
    pool: Annotated[str, typer.Argument(help="bundled | natural-instructions | hub | a local pool directory.")],
    tasks: Annotated[Optional[str], typer.Option(
        help="Comma-separated task names or numbers.", show_default="all")] = None,
    model: Model = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Survey directory; resumed if it holds one with the same settings.",
        show_default="runs/survey-POOL")] = None,
    max_test: Annotated[Optional[int], typer.Option(
        help="Evaluate at most this many test examples per task.", show_default="all")] = None,
    max_train: Annotated[Optional[int], typer.Option(
        help="Train each adapter on at most this many examples of the train split.", show_default="all")] = None,
    max_tasks: Annotated[Optional[int], typer.Option(
        help="Survey at most this many tasks, the first by task number.", show_default="no cap")] = None,
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="A quick screen: base accuracy, majority rate and prompt tokens; no adapter trained.")
    ] = False,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
) -> None:
    """Per task: base and fine-tuned exact-match accuracy, majority-class rate, mean prompt tokens, and the
    adapter's accuracy alone at scales 0.1, 0.25, 0.5 and 1 (survey.csv, survey.md); --base-only: the first three."""
    # deferred for start time: the survey pulls in torch and transformers
    from mergeability.config import load_config, override
    from mergeability.pipelines.stages import safe_name
    from mergeability.pipelines.survey import run_survey

    cfg = override(load_config(None, None, kind="tasks"), pool=pool, tasks=_split(tasks), model=model,
                   max_test=max_test, max_tasks=max_tasks, device=device, dtype=dtype, seed=seed)
    out = out or Path("runs") / f"survey-{safe_name(Path(pool).name or pool)}"
    run_survey(cfg, out, max_train=max_train, base_only=base_only, console=console)
    console.print(f"wrote {out / 'survey.csv'} and {out / 'survey.md'}")


# ------------------------------------------------------------------------------------------- the one error path
USAGE, INTERRUPTED = 2, 130  # exit statuses: bad input of any kind; an interrupt (128 + SIGINT, as shells report)


def main() -> None:
    """Run the command line. Bad input (a MergeabilityError, a usage error, an OSError such as a permission denied)
    is one `error: …` line on stderr and exit 2; an interrupt is one line and exit 130; any other exception is a
    bug and keeps its traceback."""
    try:
        code = invoke(sys.argv[1:])
    except MergeabilityError as e:
        fail(str(e))
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is the answer (printed as it was made)
            print(e.format_message(), end="")
            sys.exit(USAGE)
        hint = f" (try '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        fail(e.format_message() + hint)
    except ClickException as e:
        fail(e.format_message())
    except BrokenPipeError:  # the reader (e.g. `| head`) stopped reading: nothing to report, nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        fail(f"{e.strerror}: {e.filename}" if e.strerror and e.filename else e.strerror or one_line(e))
    except (KeyboardInterrupt, typer.Abort):
        interrupted()
    sys.exit(code)


def invoke(args: list[str]) -> int:
    """Parse `args` and run the command; the exit status of one that ends early (--help). Unlike typer's standalone
    mode, which prints usage errors in a box and turns an interrupt into a silent exit 130 before `main` could see
    it, this lets every exception through to `main`."""
    command = typer.main.get_command(app)
    if "--help" in args:  # only help shows the config's defaults: reading them loads the config (pydantic)
        show_config_defaults(command, args)
    try:
        with command.make_context("mergeability", list(args)) as ctx:
            command.invoke(ctx)
    except typer.Exit as e:
        return e.exit_code
    return 0


def fail(message: str) -> typing.NoReturn:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    print("error: " + " ".join(lines), file=sys.stderr)  # one line, whatever the message holds
    sys.exit(USAGE)


def interrupted() -> typing.NoReturn:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
