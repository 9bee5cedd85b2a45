"""Training updates: one per item, trained on the item's passage, and task adapters, trained on a task's examples.

An update is low-rank (LoRA) or, for items with `update: full`, a dense ΔW of each target module (paper A.8).
It is attached with forward hooks (out += scale · x Aᵀ Bᵀ, or x ΔWᵀ), initialised as PEFT does (A Kaiming-uniform,
B zero; ΔW zero), and optimised with AdamW by one loop, `fit`; the result is an `Update` that saves as a PEFT
adapter directory. The training functions take their config section (`ItemTraining`, `TaskTraining`) as it is.

A passage is trained as a list of sequences: one per line, each cut into windows of `max_tokens`. An epoch
is one optimizer step per sequence, in order (batch size 1, as a plain fine-tuning loop over documents).

Two routes give the same item updates (tested against PEFT): `train_update` runs the full model every step;
`train_updates_cached` (with an `Engine`) runs the frozen layers below the adapted one once per passage and
trains several passages in one batch, each row with its own factors. AdamW is elementwise and the batch loss
is the sum of per-row losses, so every row trains exactly as it would alone.

A task adapter (`train_task_update`) is trained on prompt + answer sequences with the loss on the answer only;
its fast loss runs the prompt prefix a batch shares once and the output head only at answer positions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergeability.batching import (
    add_to_outputs,
    attention_bias,
    cache_kwarg,
    common_prefix,
    pad_rows,
    padding_mask,
    prefix_cache,
)
from mergeability.config import ItemTraining, TaskTraining
from mergeability.models import get_module
from mergeability.updates import Dense, LowRank, Update


@dataclass(frozen=True)
class TrainStats:
    """What a training run measured besides the update it returns."""

    loss: float  # mean token cross-entropy of the last epoch, over the tokens trained on
    base_ppl: float  # perplexity under the base model of the tokens trained on: the passage (items), answers (tasks)
    input_tokens: int  # tokens of the passage (items); mean prompt tokens of the training examples (tasks)


def split_passage(tokenizer, passage: str, max_tokens: int) -> list[Tensor]:
    """The training sequences (1 × T each) of a passage: its non-empty lines, cut into windows."""
    out = []
    for line in passage.splitlines():
        if line.strip():
            ids = tokenizer(line.strip(), return_tensors="pt").input_ids
            out += [ids[:, s : s + max_tokens] for s in range(0, ids.shape[1], max_tokens) if ids.shape[1] - s > 1]
    return out


def init_factors(shape: tuple[int, int], rank: int, seed: int, key: str) -> tuple[Tensor, Tensor]:
    out_f, in_f = shape
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=√5) on an (r, in) matrix, as PEFT initialises lora_A
    A = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
    return A, torch.zeros(out_f, rank)


def init_params(model: nn.Module, modules: Sequence[str], rank: int, full: bool, seed: int, keys: Sequence[str],
                batched: bool, device) -> dict[str, tuple[Tensor, ...]]:
    """Trainable parameters per module: LoRA factors (A, B), or a dense ΔW (D,) for full updates; stacked over
    `keys` (one row per update) when batched."""
    out = {}
    for name in modules:
        shape = tuple(get_module(model, name).weight.shape)
        if full:
            init = [(torch.zeros(shape),) for _ in keys]
        else:
            init = [init_factors(shape, rank, seed, f"{k}/{name}") for k in keys]
        out[name] = tuple((torch.stack(ts) if batched else ts[0]).to(device).requires_grad_() for ts in zip(*init))
    return out


def _delta(f: tuple[Tensor, ...], scale: float) -> Callable[[Tensor], Tensor]:
    """x ↦ what one module's update adds to its output. The scale multiplies the product, as PEFT applies it; the
    engine folds it into B instead, which rounds differently: moving it here would change every trained bit."""
    if len(f) == 1:  # a dense ΔW, unscaled
        D = f[0]
        return (lambda x: x @ D.T) if D.dim() == 2 else (lambda x: torch.bmm(x, D.transpose(1, 2)))
    A, B = f
    if A.dim() == 2:
        return lambda x: scale * ((x @ A.T) @ B.T)
    return lambda x: scale * torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


def lora_hooks(model: nn.Module, factors: dict[str, tuple[Tensor, ...]], scale: float) -> AbstractContextManager[None]:
    """Add scale · x Aᵀ Bᵀ to each module's output. Factors are (r, in)/(out, r), or batched per row
    as (b, r, in)/(b, out, r); a one-tensor entry (D,) is a dense ΔW, (out, in) or (b, out, in), added unscaled."""
    return add_to_outputs(model, {name: _delta(f, scale) for name, f in factors.items()})


def fit(params: list[Tensor], steps: Sequence, step_loss: Callable, epochs: int, lr: float,
        on_step: Callable[[], None] | None = None):
    """The training loop of every update: AdamW (no weight decay) on `params`, `epochs` passes over `steps`, one
    optimizer step per step. `step_loss(step)` gives (the loss to minimise, its summed token NLL), or (None, NLL)
    when it ran the backward passes itself (micro-batches); the result is the last epoch's sum of the NLLs: a
    float, or a tensor (one entry per row) for batched training."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    last = 0.0
    with torch.enable_grad():
        for _ in range(epochs):
            last = 0.0
            for step in steps:
                opt.zero_grad(set_to_none=True)
                loss, nll = step_loss(step)
                if loss is not None:
                    loss.backward()
                opt.step()
                last += nll
                if on_step is not None:
                    on_step()
    return last


def _params(factors: dict[str, tuple[Tensor, ...]]) -> list[Tensor]:
    return [p for ab in factors.values() for p in ab]


def _result(factors, scale, cfg: ItemTraining | TaskTraining, seed, base_model, row=None) -> Update:
    """The trained update (row `row` of batched factors), with how it was trained as its provenance."""
    pick = (lambda t: t.detach().cpu().clone()) if row is None else (lambda t: t[row].detach().cpu().clone())
    mods = {n: Dense(pick(f[0])) if len(f) == 1 else LowRank(pick(f[0]), pick(f[1]), scale) for n, f in factors.items()}
    info = {"update": getattr(cfg, "update", "lora"), "lr": cfg.step_lr, "epochs": cfg.epochs, "seed": seed}
    if info["update"] == "lora":
        info.update(rank=cfg.rank, alpha=cfg.alpha)
    return Update(mods, base_model, {"training": info})


# ------------------------------------------------------------------------------ per-item updates (passages)


def train_update(
    model: nn.Module,
    sequences: Sequence[Tensor],
    modules: Sequence[str],
    cfg: ItemTraining,
    *,
    seed: int,
    key: str,
    base_model: str | None = None,
) -> tuple[Update, TrainStats]:
    """One update (LoRA, or dense ΔW with cfg.update == "full") trained on a passage's sequences (each 1 × T),
    the full model run at every step."""
    dev = sequences[0].device
    factors = init_params(model, modules, cfg.rank, cfg.update == "full", seed, [key], batched=False, device=dev)
    scale = cfg.alpha / cfg.rank
    n_tok = sum(s.shape[1] - 1 for s in sequences)
    with torch.no_grad():
        base_nll = sum(model(s, labels=s).loss.item() * (s.shape[1] - 1) for s in sequences)

    def step_loss(ids):
        loss = model(ids, labels=ids).loss
        return loss, loss.item() * (ids.shape[1] - 1)

    with lora_hooks(model, factors, scale):
        last = fit(_params(factors), sequences, step_loss, cfg.epochs, cfg.step_lr)
    stats = TrainStats(loss=last / n_tok, base_ppl=math.exp(base_nll / n_tok),
                       input_tokens=sum(s.shape[1] for s in sequences))
    return _result(factors, scale, cfg, seed, base_model), stats


def _cached_steps(engine, passages: Sequence[Sequence[Tensor]]) -> list[tuple]:
    """Per sequence index j, what a step on it needs: (labels, pos, bias, h, tokens per row), where h, the
    frozen layers' output below the adapted one, is computed here once for every epoch."""
    dev, n = engine.device, len(passages)
    steps = []
    for j in range(len(passages[0])):
        seqs = [p[j][0] for p in passages]
        ids, labels = pad_rows(seqs, 0).to(dev), pad_rows(seqs, -100).to(dev)
        T = ids.shape[1]
        pos = torch.arange(T, device=dev).expand(n, T)
        # None lets attention use its fused causal kernel when no row is padded.
        bias = None if all(len(s) == T for s in seqs) else attention_bias(
            [torch.full((len(s),), -1) for s in seqs], T, engine.dtype).to(dev)
        with torch.no_grad():
            h = engine.lower(ids, pos, bias)
        steps.append((labels, pos, bias, h, (labels[:, 1:] != -100).sum(1)))
    return steps


def _row_nll(engine, labels, pos, bias, h, n_tok) -> tuple[Tensor, Tensor]:
    """Summed NLL per row of one cached step, and the tokens per row."""
    logits = engine.model.lm_head(engine.upper(h, pos, bias)).float()
    V = logits.shape[-1]
    tok = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                      reduction="none").view(len(labels), -1)
    return tok.sum(1), n_tok


def train_updates_cached(
    engine,
    passages: Sequence[Sequence[Tensor]],
    keys: Sequence[str],
    modules: Sequence[str],
    cfg: ItemTraining,
    *,
    seed: int,
    base_model: str | None = None,
) -> list[tuple[Update, TrainStats]]:
    """One update per passage, all in one batch (row b = passage b, its factors seeded by keys[b]), from the
    engine's cached lower layers. Each equals `train_update` on that passage alone (to float rounding).

    Passages must have the same number of sequences: step j of an epoch trains every row on its sequence j.
    """
    if len({len(p) for p in passages}) != 1:
        raise ValueError("train_updates_cached needs passages with equal numbers of sequences: group them first")
    steps = _cached_steps(engine, passages)
    with torch.no_grad():
        base = [_row_nll(engine, *st) for st in steps]
    n_tok = sum(t for _, t in base).cpu()
    base_nll = sum(nll for nll, _ in base).cpu()
    factors = init_params(engine.model, modules, cfg.rank, cfg.update == "full", seed, keys, batched=True,
                          device=engine.device)
    scale = cfg.alpha / cfg.rank

    def step_loss(st):
        nll, tok = _row_nll(engine, *st)
        return (nll / tok).sum(), nll.detach().cpu()  # each row's mean loss: its gradient is what it would be alone

    with lora_hooks(engine.model, factors, scale):
        last = fit(_params(factors), steps, step_loss, cfg.epochs, cfg.step_lr)
    return [
        (_result(factors, scale, cfg, seed, base_model, row=b),
         TrainStats(loss=(last[b] / n_tok[b]).item(), base_ppl=math.exp((base_nll[b] / n_tok[b]).item()),
                    input_tokens=sum(s.shape[1] for s in passages[b])))
        for b in range(len(passages))
    ]


# ---------------------------------------------------------------- task adapters (Lots-of-LoRAs style)


def task_sequence(tokenizer, example) -> tuple[list[int], int]:
    """(token ids, prompt length) of one training example as a task adapter is trained on it: prompt + ' ' +
    first reference + EOS; the tokens after the prompt are the answer the loss (and the answer perplexity) scores."""
    p = tokenizer(example.input).input_ids
    a = tokenizer(" " + example.outputs[0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + a, len(p)


def training_tokens(tokenizer, examples) -> float:
    """The training context length of a task (paper A.6): the mean tokens of its training sequences, prompt,
    answer and EOS, exactly as `task_batches` builds them."""
    if not examples:
        raise ValueError("no training examples: a training context length needs at least one")
    return sum(len(task_sequence(tokenizer, e)[0]) for e in examples) / len(examples)


def task_batches(tokenizer, examples, batch_size: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(ids, attention mask, labels) per step: `task_sequence` rows, right-padded; labels are -100 on the prompt
    and the padding, so the loss is on the answer only."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for s in range(0, len(examples), batch_size):
        rows = [task_sequence(tokenizer, e) for e in examples[s : s + batch_size]]
        T = max(len(ids) for ids, _ in rows)
        ids = pad_rows([seq for seq, _ in rows], pad, T)
        mask = padding_mask([len(seq) for seq, _ in rows], T)
        labels = pad_rows([[-100] * n_prompt + seq[n_prompt:] for seq, n_prompt in rows], -100, T)
        out.append((ids, mask, labels))
    return out


def shared_prefix(ids: Tensor, labels: Tensor) -> int:
    """Length of the token prefix every row shares, stopping at least one token before any row's answer
    (the prompts of a task share its definition and examples: most of every sequence)."""
    first_label = int((labels != -100).int().argmax(1).min())
    return max(0, min(common_prefix(ids.tolist()), first_label - 1))


def answer_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, *, plain: bool = False) -> Tensor:
    """Mean cross-entropy of the answer tokens. The fast route runs the shared prompt prefix once for the whole
    batch (its keys and values are broadcast to every row) and the output head only where a label is (the
    49k-token head is a third of a small model's cost); `plain` is HF's full-logits loss, for checking."""
    if plain:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    body = getattr(model, model.base_model_prefix)
    P = shared_prefix(ids, labels) if len(ids) > 1 else 0
    if P > 0:
        cache = prefix_cache(body, ids[:1, :P], len(ids))
        pos = torch.arange(P, ids.shape[1], device=ids.device).expand(len(ids), -1)
        h = body(input_ids=ids[:, P:], attention_mask=mask, position_ids=pos, use_cache=True,
                 **{cache_kwarg(body): cache}).last_hidden_state[:, :-1]
    else:
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, P + 1 :]
    keep = target != -100
    logits = model.get_output_embeddings()(h[keep]).float()
    return nn.functional.cross_entropy(logits, target[keep])


def micro_batches(batch: tuple[Tensor, Tensor, Tensor], max_tokens: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """A step's rows in micro-batches of at most `max_tokens` padded tokens (at least one row each): what one
    backward pass holds. Attention keeps rows x length^2 scores for the backward pass, so a step of 8 long prompts
    (800 tokens: 9.5 GB with the bundled model) must not run at once (one row: 2.7 GB)."""
    rows = max(1, max_tokens // batch[0].shape[1])
    return [tuple(t[s : s + rows] for t in batch) for s in range(0, len(batch[0]), rows)]


def _micro_step_loss(model: nn.Module, batch, n: int, max_tokens: int, plain: bool) -> tuple[Tensor | None, float]:
    """(loss, summed answer NLL) of one step; a step over `max_tokens` runs backward per micro-batch, each weighted
    by its share of the step's answer tokens, so the gradients add up to the whole step's (loss None: done)."""
    parts = micro_batches(batch, max_tokens)
    if len(parts) == 1:
        loss = answer_loss(model, *batch, plain=plain)
        return loss, loss.item() * n
    nll = 0.0
    for part in parts:
        n_part = int((part[2][:, 1:] != -100).sum())
        if n_part:
            loss = answer_loss(model, *part, plain=plain)
            (loss * (n_part / n)).backward()
            nll += loss.item() * n_part
    return None, nll


def _answer_steps(model: nn.Module, tokenizer, examples, batch_size: int) -> tuple[list[tuple], list[int]]:
    """The batches of `task_batches` on the model's device, and the answer tokens each one scores."""
    dev = next(model.parameters()).device
    steps = [tuple(t.to(dev) for t in b) for b in task_batches(tokenizer, examples, batch_size)]
    return steps, [int((lab[:, 1:] != -100).sum()) for _, _, lab in steps]


@torch.no_grad()
def _answer_nll(model: nn.Module, steps, n_ans, plain: bool) -> float:
    return sum(answer_loss(model, *st, plain=plain).item() * n for st, n in zip(steps, n_ans))


def answer_perplexity(model: nn.Module, tokenizer, examples, batch_size: int = 8) -> float:
    """Perplexity of the answers given their prompts, under the model as it is (paper A.5 with the base model):
    exp of the mean negative log-likelihood over every answer token of `examples` — each one's first reference
    and the EOS that ends it (`task_sequence`); prompt tokens are context, never scored."""
    steps, n_ans = _answer_steps(model, tokenizer, examples, batch_size)
    return math.exp(_answer_nll(model, steps, n_ans, plain=False) / sum(n_ans))


def train_task_update(
    model: nn.Module,
    tokenizer,
    examples,
    modules: Sequence[str],
    cfg: TaskTraining,
    *,
    seed: int,
    key: str,
    base_model: str | None = None,
    plain: bool = False,
    on_step: Callable[[], None] | None = None,
) -> tuple[Update, TrainStats]:
    """One LoRA update for a task: `epochs` passes over its training examples in fixed order, `batch_size` a step,
    the loss on the answers only (`plain`: HF's full-logits loss, for checking); a step longer than
    `cfg.micro_tokens` runs in micro-batches with the same gradient (`micro_batches`). `on_step` is called after each
    optimizer step. TrainStats: the last epoch's answer loss, the base model's perplexity of the answers, the
    mean prompt length in tokens."""
    steps, n_ans = _answer_steps(model, tokenizer, examples, cfg.batch_size)
    factors = init_params(model, modules, cfg.rank, False, seed, [key], batched=False, device=steps[0][0].device)
    scale = cfg.alpha / cfg.rank
    base_nll = _answer_nll(model, steps, n_ans, plain)

    def step_loss(step):
        return _micro_step_loss(model, *step, cfg.micro_tokens, plain)

    with lora_hooks(model, factors, scale):
        last = fit(_params(factors), list(zip(steps, n_ans)), step_loss, cfg.epochs, cfg.step_lr, on_step)
    prompt_tokens = sum(int(m.sum()) for _, m, _ in steps) - sum(n_ans)
    stats = TrainStats(loss=last / sum(n_ans), base_ppl=math.exp(base_nll / sum(n_ans)),
                       input_tokens=round(prompt_tokens / len(examples)))
    return _result(factors, scale, cfg, seed, base_model), stats
