"""The `mergeability` command. Thin: each subcommand parses, calls library functions, and prints."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from mergeability.errors import MergeabilityError

app = typer.Typer(
    help="Measure, explain and exploit how well model updates (LoRA adapters, task vectors) survive merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

# Options several commands share.
Device = Annotated[Optional[str], typer.Option(help="cpu | cuda.")]
Dtype = Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16.")]
Seed = Annotated[Optional[int], typer.Option(help="Run seed.")]
Backend = Annotated[Optional[str], typer.Option(help="Where trials run: local (default) | ray.")]
RayAddress = Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: start a local one).")]
Workers = Annotated[Optional[int], typer.Option(help="Ray actors (default: one per GPU, or per CPU).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out, skipping recorded work.")]



def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeabilityError(f"{what} must be comma-separated numbers, got {text!r}") from None


@app.command()
def merge(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter directories to merge (two or more).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT adapter directory (must not exist).")],
    method: Annotated[str, typer.Option(help="mean | task_arithmetic | ties | knots")] = "knots",
    weights: Annotated[Optional[str], typer.Option(
        help="Per-adapter weights, comma-separated (e.g. 1,2,1), or base-accuracy: softmax((1-acc)/T) with acc the "
             "base model's accuracy on each adapter's --eval set (paper §6).")] = None,
    eval_sets: Annotated[Optional[list[Path]], typer.Option(
        "--eval", help="A task split file (.jsonl/.parquet with input, output) per adapter, in adapter order: "
                       "report base, fine-tuned and merged exact-match accuracy on each.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model for --eval (default: the adapters' base model).")] = None,
    base_accuracy: Annotated[
        Optional[str],
        typer.Option(help="Per-adapter base-model accuracies in [0,1]; weights become softmax((1-acc)/T) (paper §6)."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="T of the base-accuracy weights.")] = 1.0,
    density: Annotated[Optional[float], typer.Option(help="ties/knots: fraction of entries kept, in (0, 1]. [0.2]")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Scale of the merged update. [1.0]")] = None,
    per_module: Annotated[bool, typer.Option("--per-module", help="ties/knots: trim per module, not per update.")] = False,
    dare: Annotated[Optional[float], typer.Option(help="ties/knots: DARE drop probability instead of trimming.")] = None,
    inner: Annotated[Optional[str], typer.Option(help="knots: merge of the aligned blocks, ties or mean. [ties]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for DARE's random masks. [0]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Merge LoRA adapters into one PEFT adapter directory whose ΔW is the merge."""
    from mergeability.merging import base_accuracy_weights, get_method
    from mergeability.updates import load_update, save_update

    params = {"density": density, "lam": lam, "dare": dare, "inner": inner, "seed": seed}
    params = {k: v for k, v in params.items() if v is not None}
    if per_module:
        params["per_module"] = True
    merger = get_method(method, **params)  # validates method and parameter names first: fail before any I/O
    if len(adapters) < 2:
        raise MergeabilityError(f"a merge needs at least two adapters, got {len(adapters)}")
    if out.exists() and not force:
        raise MergeabilityError(f"{out} already exists: choose another path or pass --force")
    if weights is not None and base_accuracy is not None:
        raise MergeabilityError("pass either --weights or --base-accuracy, not both")
    by_base = weights is not None and weights.strip().lower().replace("_", "-") == "base-accuracy"
    if by_base and not eval_sets:
        raise MergeabilityError("--weights base-accuracy needs --eval: one task file per adapter, to measure the "
                                "base model's accuracy on")
    if (by_base or base_accuracy is not None) and not temperature > 0:
        raise MergeabilityError(f"temperature must be > 0, got {temperature}")
    if eval_sets and len(eval_sets) != len(adapters):
        raise MergeabilityError(f"got {len(eval_sets)} --eval files for {len(adapters)} adapters: pass one per adapter")
    w = None
    if weights is not None and not by_base:
        w = _floats(weights, "--weights")
    elif base_accuracy is not None:
        w = base_accuracy_weights(_floats(base_accuracy, "--base-accuracy"), temperature)
    if w is not None and len(w) != len(adapters):
        raise MergeabilityError(f"got {len(w)} weights for {len(adapters)} adapters: pass one per adapter")
    updates = [load_update(a) for a in adapters]
    evaluator = _Evaluator(adapters, updates, eval_sets, model) if eval_sets else None
    if by_base:
        w = base_accuracy_weights(evaluator.base_acc, temperature)
    t0 = time.perf_counter()
    merged = merger.merge(updates, w)
    elapsed = time.perf_counter() - t0
    merged.meta["merge"]["sources"] = [str(a) for a in adapters]
    if evaluator is not None:
        merged.meta["merge"]["base_accuracy"] = evaluator.base_acc
        evaluator.report(merged, w, console)
    save_update(merged, out, force=force)
    table = Table(title=f"{method} merge of {len(updates)} adapters → {out}")
    for col in ("module", "kind", "rank", "‖ΔW‖_F", "σ_max"):
        table.add_column(col)
    for name, m in merged.modules.items():
        kind = type(m).__name__
        rank = str(m.rank) if kind == "LowRank" else "full"
        table.add_row(name, kind, rank, f"{m.fro_norm():.4g}", f"{m.singular_values()[0].item():.4g}")
    console.print(table)
    console.print(f"merged in {elapsed * 1000:.1f} ms; weights {['%.3g' % x for x in (w or [1.0] * len(updates))]}")


class _Evaluator:
    """Exact-match accuracy of the base model, each adapter alone, and the merge, on each adapter's task file."""

    def __init__(self, adapters, updates, files, model):
        from mergeability.data.tasks import read_split
        from mergeability.exact_match import evaluate_task
        from mergeability.models import load_model
        from mergeability.pipelines.tasks import check_bases

        self.sets = [read_split(Path(f)) for f in files]  # schema errors before the model loads
        model = model or next((u.base_model for u in updates if u.base_model), None)
        if not model:
            raise MergeabilityError("cannot tell the adapters' base model: pass --model")
        check_bases(((Path(a).name, u.base_model) for a, u in zip(adapters, updates)), model)
        self.lm = load_model(model)
        self.names = [Path(a).name for a in adapters]
        self.evaluate = lambda ex, upd=None: evaluate_task(self.lm.model, self.lm.tokenizer, ex, upd)[0]
        with Progress(console=console, transient=True) as p:
            bar = p.add_task("base accuracy", total=len(self.sets))
            self.base_acc = []
            for ex in self.sets:
                self.base_acc.append(self.evaluate(ex))
                p.advance(bar)
        self.updates = updates

    def report(self, merged, weights, console) -> None:
        table = Table(title="exact-match accuracy on each adapter's --eval set")
        for col in ("adapter", "weight", "base", "fine-tuned", "merged"):
            table.add_column(col, justify="left" if col == "adapter" else "right")
        w = weights or [1.0 / len(self.sets)] * len(self.sets)
        total = sum(w)
        with Progress(console=console, transient=True) as p:
            bar = p.add_task("evaluating", total=2 * len(self.sets))
            for name, ex, upd, wi, b in zip(self.names, self.sets, self.updates, w, self.base_acc):
                ft = self.evaluate(ex, upd)
                p.advance(bar)
                mg = self.evaluate(ex, merged)
                p.advance(bar)
                table.add_row(name, f"{wi / total:.3f}", f"{b:.2f}", f"{ft:.2f}", f"{mg:.2f}")
        console.print(table)


run_app = typer.Typer(help="End-to-end mergeability runs.", no_args_is_help=True)
app.add_typer(run_app, name="run")


@run_app.command("popqa")
def run_popqa_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/popqa"),
    config: Annotated[Optional[Path], typer.Option(help="YAML config file; flags override it.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="demo | paper-llama | paper-qwen")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hub id, local directory, or smollm2-135m.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="geo | popqa | PATH (.tsv/.jsonl/.parquet).")] = None,
    relations: Annotated[Optional[str], typer.Option(help="Comma-separated relations to keep.")] = None,
    items: Annotated[Optional[int], typer.Option(help="Questions screened by the base model.")] = None,
    trials: Annotated[Optional[int], typer.Option(help="M: trials per update.")] = None,
    partners: Annotated[Optional[int], typer.Option(help="N: partners merged with the update per trial.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Merge method: knots | ties | mean | task_arithmetic.")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Decoder layer to adapt (default: the middle one).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    update: Annotated[Optional[str], typer.Option(help="lora (default) | full: dense ΔW of the target modules (A.8).")] = None,
    device: Device = None,
    dtype: Dtype = None,
    seed: Seed = None,
    engine: Annotated[Optional[str], typer.Option(help="fast (default) | plain: the obvious path, for checking.")] = None,
    backend: Backend = None,
    ray_address: RayAddress = None,
    workers: Workers = None,
    resume: Resume = False,
) -> None:
    """Example-level mergeability (paper §2, §3.1): screen, train one LoRA per wrong item, score by merging."""
    from mergeability.config import load_config
    from mergeability.pipelines import run_popqa

    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    cfg = load_config(config, preset).replace(
        model=model, dataset=dataset, items=items, trials=trials, partners=partners, method=method, layer=layer,
        rank=rank, update=update, device=device, dtype=dtype, seed=seed, engine=engine, backend=backend, ray_address=ray_address,
        workers=workers,
        relations=[r.strip() for r in relations.split(",") if r.strip()] if relations else None,
    )
    run_popqa(cfg, out, resume=resume, console=console)
    console.print(f"wrote {out / 'scores.csv'} and {out / 'results.sqlite'}")


@run_app.command("tasks")
def run_tasks_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/tasks"),
    config: Annotated[Optional[Path], typer.Option(help="YAML config file; flags override it.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="bundled (default without --config/--pool) | lots-of-loras")] = None,
    pool: Annotated[Optional[str], typer.Option(help="bundled | hub (Lots-of-LoRAs) | a local pool directory.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated task names or numbers (default: all).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hub id, local directory, or smollm2-135m.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Keep tasks with fine-tuned accuracy ≥ this. [0.9]")] = None,
    trials: Annotated[Optional[int], typer.Option(help="M: trials per task. [5]")] = None,
    partners: Annotated[Optional[int], typer.Option(help="N: partners merged with the task per trial. [5]")] = None,
    method: Annotated[Optional[str], typer.Option(help="Merge method: knots | ties | mean | task_arithmetic.")] = None,
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
    from mergeability.config import TaskConfig, load_config
    from mergeability.pipelines import run_tasks
    from mergeability.report.build import build_report

    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    if preset is None and config is None and pool in (None, "bundled"):
        preset = "bundled"
    cfg = load_config(config, preset, cls=TaskConfig).replace(
        pool=pool, model=model, threshold=threshold, trials=trials, partners=partners, method=method, rank=rank,
        max_test=max_test, device=device, dtype=dtype, seed=seed, backend=backend, ray_address=ray_address,
        workers=workers,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
    )
    run_tasks(cfg, out, resume=resume, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it exists).")] = Path("runs/demo"),
) -> None:
    """The paper's main experiment on the bundled model and the bundled geo dataset, sized for a laptop CPU."""
    from mergeability.config import load_config
    from mergeability.pipelines import run_popqa

    from mergeability.report.build import build_report

    cfg = load_config(None, "demo")
    run_popqa(cfg, out, resume=True, console=console)
    html_path, _ = build_report(out)
    console.print(f"wrote {out / 'scores.csv'}, {out / 'results.sqlite'} and the report {html_path}")


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="algorithms | robustness | locality | groups (example level); "
                                             "weighted (task level)")],
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
    from mergeability.experiments import run_experiment
    from mergeability.report.build import build_report

    if name == "weighted":
        from mergeability.merging import get_method
        from mergeability.weighted import WeightedSpec, run_weighted

        ms = tuple(m.strip() for m in methods.split(",") if m.strip())
        for m in ms:
            get_method(m)
        spec = WeightedSpec(sets=sets, low=low, high=high, temperature=temperature,
                            sweep=tuple(_floats(sweep, "--sweep")), methods=ms)
    overrides = dict(backend=backend, ray_address=ray_address, workers=workers)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name == "weighted":
        run_weighted(run_dir, spec, console, overrides)
    else:
        run_experiment(name, run_dir, console, overrides)
    html_path, _ = build_report(run_dir)
    console.print(f"experiment {name} recorded in {run_dir / 'results.sqlite'}; report refreshed: {html_path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A finished (or partly finished) run directory.")]) -> None:
    """Write report.html (self-contained) and report.md with figures, tables and the claims table."""
    from mergeability.report.build import build_report

    html_path, claims = build_report(run_dir)
    table = Table(title="claims")
    for col in ("claim", "measured", "verdict"):
        table.add_column(col)
    for c in claims:
        table.add_row(c.claim, c.measured, c.verdict)
    console.print(table)
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
