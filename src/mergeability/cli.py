"""The `mergeability` command. Thin: each subcommand parses, calls library functions, and prints."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mergeability.adapters import (
    EvalSets,
    check_merge_request,
    floats,
    load_adapters,
    merge_adapters,
    merge_weights,
    method_params_help,
    parse_params,
)
from mergeability.config import load_config, override
from mergeability.console import print_table
from mergeability.errors import MergeabilityError
from mergeability.experiments import get_experiment, run_experiment
from mergeability.experiments.study import run_study
from mergeability.merging import get_method
from mergeability.pipelines import run_examples, run_tasks
from mergeability.report.build import build_report
from mergeability.report.compare import compare_runs

app = typer.Typer(
    help="Measure, explain and exploit how well model updates (LoRA adapters, task vectors) survive merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

# Options several commands share.
Device = Annotated[Optional[str], typer.Option(help="cpu | cuda | cuda:N.")]
Dtype = Annotated[Optional[str], typer.Option(help="float32 | float64 | bfloat16 | float16.")]
Seed = Annotated[Optional[int], typer.Option(help="Run seed.")]
Backend = Annotated[Optional[str], typer.Option(help="Where trials run: local (default) | ray.")]
RayAddress = Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: start a local one).")]
Workers = Annotated[Optional[int], typer.Option(help="Ray actors (default: one per GPU, or per CPU).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out, skipping recorded work.")]
Config = Annotated[Optional[Path], typer.Option(help="YAML config file; flags override it.")]
Method = Annotated[Optional[str], typer.Option(help="Merge method: knots | ties | mean | task_arithmetic.")]
Trials = Annotated[Optional[int], typer.Option(help="M: trials per update.")]
Partners = Annotated[Optional[int], typer.Option(help="N: partners merged with the update per trial.")]
Model = Annotated[Optional[str], typer.Option(
    help="Hub id, local directory, or a built-in model: smollm2-135m (bundled) | gemma3-270m (fetched on first use).")]


@app.command()
def merge(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter directories to merge (two or more).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT adapter directory (must not exist).")],
    method: Annotated[str, typer.Option(help="mean | task_arithmetic | ties | knots")] = "knots",
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", "-p", help=f"A method parameter KEY=VALUE (repeatable). {method_params_help()}.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="Per-adapter weights, comma-separated (e.g. 1,2,1), or base-accuracy: softmax((1-acc)/T) with acc the "
             "base model's accuracy on each adapter's --eval set (paper §6).")] = None,
    eval_sets: Annotated[Optional[list[Path]], typer.Option(
        "--eval", help="A task split file (.jsonl/.parquet with input, output) per adapter, in adapter order: "
                       "report base, fine-tuned and merged exact-match accuracy on each.")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model for --eval (default: the adapters' base model).")] = None,
    base_accuracy: Annotated[Optional[str], typer.Option(
        help="Per-adapter base-model accuracies in [0,1]; weights become softmax((1-acc)/T) (paper §6).")] = None,
    temperature: Annotated[float, typer.Option(help="T of the base-accuracy weights.")] = 1.0,
    density: Annotated[Optional[float], typer.Option(help="Shortcut for --param density=…")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Shortcut for --param lam=…")] = None,
    per_module: Annotated[bool, typer.Option("--per-module", help="Shortcut for --param per_module=true")] = False,
    dare: Annotated[Optional[float], typer.Option(help="Shortcut for --param dare=…")] = None,
    inner: Annotated[Optional[str], typer.Option(help="Shortcut for --param inner=…")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Shortcut for --param seed=…")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Merge LoRA adapters into one PEFT adapter directory whose ΔW is the merge."""
    shortcuts = {"density": density, "lam": lam, "dare": dare, "inner": inner, "seed": seed,
                 "per_module": True if per_module else None}
    params = {**{k: v for k, v in shortcuts.items() if v is not None}, **parse_params(method, param or [])}
    merger = get_method(method, **params)  # validates method and parameter names first: fail before any I/O
    if weights is not None and weights.strip().lower().replace("_", "-") == "base-accuracy":
        weights = "base-accuracy"
    check_merge_request(adapters, out, force, weights, base_accuracy, eval_sets, temperature)
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
    dataset: Annotated[Optional[str], typer.Option(
        help="geo | wikidata (BIG-bench's Wikidata facts) | popqa | PATH (.tsv/.jsonl/.parquet). [geo]")] = None,
    passages: Annotated[Optional[str], typer.Option(
        help="Training text where the dataset has no passage column: PATH (.jsonl/.parquet/.tsv of subj, passage) "
             "| wikipedia (each subject's page, fetched and cached). [the dataset's own]")] = None,
    relations: Annotated[Optional[str], typer.Option(help="Comma-separated relations to keep. [all]")] = None,
    items: Annotated[Optional[int], typer.Option(help="Questions screened by the base model. [200]")] = None,
    per_subject: Annotated[Optional[int], typer.Option(
        help="At most this many questions per subject, across relations (PopQA asks one). [1]")] = None,
    trials: Trials = None,
    partners: Partners = None,
    method: Method = None,
    layer: Annotated[Optional[int], typer.Option(help="Decoder layer to adapt. [the middle one]")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank. [64]")] = None,
    update: Annotated[Optional[str], typer.Option(
        help="lora | full: dense ΔW of the target modules (A.8). [lora]")] = None,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
    engine: Annotated[Optional[str], typer.Option(help="fast | plain: the obvious path, for checking. [fast]")] = None,
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
    resume: Resume = False,
) -> None:
    """Example-level mergeability on PopQA-schema data (paper §2, §3.1): screen, train one LoRA per wrong item,
    score by merging."""
    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    cfg = override(load_config(config, preset), model=model, dataset=dataset, passages=passages, items=items,
                   per_subject=per_subject, trials=trials, partners=partners, method=method, layer=layer, rank=rank,
                   update=update, device=device, dtype=dtype, seed=seed, engine=engine, backend=backend,
                   ray_address=ray_address, workers=workers, relations=_split(relations))
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
        help="bundled (default without --config/--pool) | lots-of-loras")] = None,
    pool: Annotated[Optional[str], typer.Option(help="bundled | hub (Lots-of-LoRAs) | a local pool directory.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated task names or numbers (default: all).")] = None,
    model: Model = None,
    threshold: Annotated[Optional[float], typer.Option(
        help="Keep tasks with fine-tuned accuracy ≥ this. [0.9]")] = None,
    trials: Trials = None,
    partners: Annotated[Optional[int], typer.Option(help="N: partners merged with the task per trial. [5]")] = None,
    method: Method = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank of trained task adapters. [16]")] = None,
    max_test: Annotated[Optional[int], typer.Option(help="Evaluate at most this many test examples per task.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
    resume: Resume = False,
) -> None:
    """Task-level mergeability (paper §3.2): base and fine-tuned accuracy per task, threshold, score by merging."""
    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    if preset is None and config is None and pool in (None, "bundled"):
        preset = "bundled"
    cfg = override(load_config(config, preset, kind="tasks"), pool=pool, model=model, threshold=threshold,
                   trials=trials, partners=partners, method=method, rank=rank, max_test=max_test, device=device,
                   dtype=dtype, seed=seed, backend=backend, ray_address=ray_address, workers=workers,
                   tasks=_split(tasks))
    run_tasks(cfg, out, resume=resume, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it exists).")] = Path("runs/demo"),
) -> None:
    """The paper's main experiment on the bundled model and the bundled geo dataset, sized for a laptop CPU."""
    run_examples(load_config(None, "demo"), out, resume=True, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="algorithms | robustness | locality | groups | knots-settings "
                                             "(example level); weighted (task level)")],
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    sets: Annotated[int, typer.Option(help="weighted: random task sets.")] = 8,
    low: Annotated[int, typer.Option(help="weighted: tasks per set from the weaker half by base accuracy.")] = 2,
    high: Annotated[int, typer.Option(help="weighted: tasks per set from the stronger half.")] = 2,
    temperature: Annotated[float, typer.Option(help="weighted: T of softmax((1 - acc)/T) for every method.")] = 0.5,
    sweep: Annotated[str, typer.Option(help="weighted: other T values, tried with the mean merge.")] = "0.1,0.25,1,2",
    methods: Annotated[str, typer.Option(help="weighted: merge methods to weight.")] = "mean,ties,knots",
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Run one of the paper's follow-up experiments on a run's updates (resumable), then refresh its report."""
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
def report(run_dir: Annotated[Path, typer.Argument(help="A finished (or partly finished) run directory.")]) -> None:
    """Write report.html (self-contained) and report.md with figures, tables and the claims table."""
    html_path, claims = build_report(run_dir)
    print_table(console, "claims", ["claim", "measured", "verdict"], [[c.claim, c.measured, c.verdict] for c in claims])
    console.print(f"wrote {html_path} and {html_path.with_suffix('.md')}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more example-level run directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where compare.html and compare.md go.")] = Path(
        "runs/compare"),
) -> None:
    """Runs side by side (paper A.2, Llama vs Qwen): a column per run, score histograms on shared bins, each run's
    correlations and claims."""
    html_path, tables = compare_runs(run_dirs, out)
    print_table(console, tables[0].title, tables[0].columns, tables[0].rows)
    console.print(f"wrote {html_path} and {html_path.with_suffix('.md')}")


def main() -> None:
    try:
        app()
    except MergeabilityError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
