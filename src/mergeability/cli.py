"""The `mergeability` command. Thin: each subcommand parses, calls library functions, and prints."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mergeability.errors import MergeabilityError

app = typer.Typer(
    help="Measure, explain and exploit how well model updates (LoRA adapters, task vectors) survive merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


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
    weights: Annotated[Optional[str], typer.Option(help="Per-adapter weights, comma-separated, e.g. 1,2,1.")] = None,
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
    w = None
    if weights is not None:
        w = _floats(weights, "--weights")
    elif base_accuracy is not None:
        w = base_accuracy_weights(_floats(base_accuracy, "--base-accuracy"), temperature)
    if w is not None and len(w) != len(adapters):
        raise MergeabilityError(f"got {len(w)} weights for {len(adapters)} adapters: pass one per adapter")
    updates = [load_update(a) for a in adapters]
    t0 = time.perf_counter()
    merged = merger.merge(updates, w)
    elapsed = time.perf_counter() - t0
    merged.meta["merge"]["sources"] = [str(a) for a in adapters]
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
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Run seed.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="fast (default) | plain: the obvious path, for checking.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out, skipping recorded work.")] = False,
) -> None:
    """Example-level mergeability (paper §2, §3.1): screen, train one LoRA per wrong item, score by merging."""
    from mergeability.config import load_config
    from mergeability.pipelines import run_popqa

    if resume and (out / "config.yaml").exists() and config is None:
        config = out / "config.yaml"
    cfg = load_config(config, preset).replace(
        model=model, dataset=dataset, items=items, trials=trials, partners=partners, method=method, layer=layer,
        rank=rank, device=device, dtype=dtype, seed=seed, engine=engine,
        relations=[r.strip() for r in relations.split(",") if r.strip()] if relations else None,
    )
    run_popqa(cfg, out, resume=resume, console=console)
    console.print(f"wrote {out / 'scores.csv'} and {out / 'results.sqlite'}")


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
    name: Annotated[str, typer.Argument(help="algorithms | robustness | locality | groups")],
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
) -> None:
    """Run one of the paper's follow-up experiments on a run's updates (resumable), then refresh its report."""
    from mergeability.experiments import run_experiment
    from mergeability.report.build import build_report

    run_experiment(name, run_dir, console)
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
