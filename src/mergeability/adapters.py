"""Merging PEFT adapter directories, as `mergeability merge` does: method parameters from text, weights (given,
or from the base model's accuracy on each adapter's task, paper §6), the merge, an optional evaluation of base,
fine-tuned and merged accuracy, and the merged adapter written with its provenance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergeability.atomic import check_creatable
from mergeability.data.tasks import read_split
from mergeability.errors import MergeabilityError, one_line
from mergeability.exact_match import evaluate_task
from mergeability.merging import METHODS, base_accuracy_weights, get_method
from mergeability.models import load_model
from mergeability.pipelines.tasks import check_bases
from mergeability.updates import Update, check_replaceable, load_update, representable, save_update

DEFAULT_TEMPERATURE = 1.0  # T of the base-accuracy weights when --temperature is not given


def method_params_help() -> str:
    """Every registered method's parameters with their defaults, for --help."""
    parts = []
    for name, cls in METHODS.items():
        fields = [f"{f.name}={f.default}" for f in dataclasses.fields(cls)]
        parts.append(f"{name}: {', '.join(fields) or '(none)'}")
    return "; ".join(parts)


def parse_params(method: str, items: Sequence[str]) -> dict:
    """KEY=VALUE texts as the method's parameters (values read as YAML scalars: 0.2, true, null, ties)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeabilityError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MergeabilityError(f"--param {key}: cannot read the value {value!r}") from None
    merger = get_method(method, **params)  # unknown names and bad values are errors now, before any I/O
    return {k: getattr(merger, k) for k in params}  # as the method stores them (1 -> 1.0 for a number, …)


def floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MergeabilityError(f"{what} must be comma-separated numbers, got {text!r}") from None


@dataclass
class EvalSets:
    """Exact-match accuracy on each adapter's task file: the base model's, each adapter's alone, the merge's."""

    names: list[str]
    sets: list[list]
    lm: object
    base_acc: list[float]

    @classmethod
    def build(cls, adapters: Sequence[Path], updates: Sequence[Update], files: Sequence[Path], model: str | None):
        sets = [read_split(Path(f)) for f in files]  # schema errors before the model loads
        model = model or next((u.base_model for u in updates if u.base_model), None)
        if not model:
            raise MergeabilityError("cannot tell the adapters' base model: pass --model")
        check_bases(((Path(a).name, u.base_model) for a, u in zip(adapters, updates)), model)
        lm = load_model(model)
        base = [evaluate_task(lm.model, lm.tokenizer, ex)[0] for ex in sets]
        return cls([Path(a).name for a in adapters], sets, lm, base)

    def rows(self, updates: Sequence[Update], merged: Update, weights: Sequence[float] | None) -> list[list[str]]:
        """(adapter, normalised weight, base, fine-tuned, merged accuracy) per adapter."""
        w = weights or [1.0 / len(self.sets)] * len(self.sets)
        acc = lambda ex, u: evaluate_task(self.lm.model, self.lm.tokenizer, ex, u)[0]  # noqa: E731
        return [[n, f"{wi / sum(w):.3f}", f"{b:.2f}", f"{acc(ex, u):.2f}", f"{acc(ex, merged):.2f}"]
                for n, ex, u, wi, b in zip(self.names, self.sets, updates, w, self.base_acc)]


def check_merge_request(adapters, out: Path, force: bool, weights, base_accuracy, eval_files,
                        temperature: float | None, params: dict | None = None, seed_flag: bool = False) -> None:
    """What can be checked before any adapter is read. `temperature` is None where it was not given; `params`
    are the method's parameters, `seed_flag` whether --seed set one of them."""
    if len(adapters) < 2:
        raise MergeabilityError(f"a merge needs at least two adapters, got {len(adapters)}")
    if seed_flag and (params or {}).get("dare") is None:
        raise MergeabilityError("--seed only seeds DARE's random masks: it has no effect without --dare "
                                "(or --param dare=…); drop --seed or add --dare")
    check_distinct(adapters)
    check_out(out, adapters, force)
    if weights is not None and base_accuracy is not None:
        raise MergeabilityError("pass either --weights or --base-accuracy, not both")
    if weights == "base-accuracy" and not eval_files:
        raise MergeabilityError("--weights base-accuracy needs --eval: one task file per adapter, to measure the "
                                "base model's accuracy on")
    by_accuracy = weights == "base-accuracy" or base_accuracy is not None
    if temperature is not None and not by_accuracy:
        raise MergeabilityError("--temperature has no effect without base-accuracy weights: pass --weights "
                                "base-accuracy or --base-accuracy, or drop --temperature")
    if by_accuracy and temperature is not None and not temperature > 0:
        raise MergeabilityError(f"temperature must be > 0, got {temperature}")
    if eval_files and len(eval_files) != len(adapters):
        raise MergeabilityError(f"got {len(eval_files)} --eval files for {len(adapters)} adapters: "
                                "pass one per adapter")
    for f in eval_files or []:
        if not Path(f).is_file():
            what = "is a directory" if Path(f).is_dir() else "does not exist"
            raise MergeabilityError(f"--eval {f} {what}: pass a task split file (.jsonl or .parquet) per adapter")


def check_distinct(adapters: Sequence[Path]) -> None:
    """The same adapter twice would silently count twice in the merge: refuse it (weights say that openly)."""
    seen: dict[Path, Path] = {}
    for a in adapters:
        key = Path(a).resolve()
        if key in seen:
            raise MergeabilityError(f"the adapter {key} is given twice (as {seen[key]} and {a}): give each once, "
                                    "and use --weights to weight one more")
        seen[key] = Path(a)


def check_out(out: Path, adapters: Sequence[Path], force: bool) -> None:
    """`--out` must be a new path, or (with --force) an adapter directory this tool wrote that is not an input;
    never a file, a user's directory, the current directory or one of its parents."""
    where = Path(out).resolve()
    if where in {Path(a).resolve() for a in adapters}:
        raise MergeabilityError(f"--out {out} is one of the adapters being merged: choose another path")
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise MergeabilityError(f"--out {out} is the current directory or holds it: choose a new directory")
    if not (Path(out).exists() or Path(out).is_symlink()):
        check_creatable(out)
    elif not force:
        raise MergeabilityError(f"{out} already exists: choose another path or pass --force")
    else:
        check_replaceable(Path(out))


def merge_weights(n: int, weights: str | None, base_accuracy: str | None, temperature: float | None,
                  evals: EvalSets | None) -> list[float] | None:
    """Per-adapter weights: given, or softmax((1 − acc)/T) of given or measured base accuracies; None = equal.
    `temperature` None is T = 1."""
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if weights == "base-accuracy":
        w = base_accuracy_weights(evals.base_acc, temperature)
    elif weights is not None:
        w = floats(weights, "--weights")
    elif base_accuracy is not None:
        w = base_accuracy_weights(floats(base_accuracy, "--base-accuracy"), temperature)
    else:
        return None
    if len(w) != n:
        raise MergeabilityError(f"got {len(w)} weights for {n} adapters: pass one per adapter")
    return w


def merge_adapters(adapters: Sequence[Path], out: Path, merger, w: Sequence[float] | None, *,
                   updates: Sequence[Update], force: bool = False, meta: dict | None = None) -> Update:
    """Merge the loaded `updates` of `adapters` and write the result; its provenance holds the method, its
    parameters, the weights, the sources and `meta`."""
    try:
        merged = merger.merge(list(updates), w)
    except torch.linalg.LinAlgError as e:  # non-finite input to an SVD: weights far beyond the dtype's range
        raise MergeabilityError(f"the merge failed ({one_line(e)}): check --weights and the adapters' scales") from None
    if not all(representable(m) for m in merged.modules.values()):
        raise MergeabilityError("the merge overflows to infinite values: use smaller --weights")
    merged.meta["merge"]["sources"] = [str(a) for a in adapters]
    merged.meta["merge"].update(meta or {})
    save_update(merged, out, force=force)
    return merged


def load_adapters(adapters: Sequence[Path]) -> list[Update]:
    return [load_update(a) for a in adapters]
