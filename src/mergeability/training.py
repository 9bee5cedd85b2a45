"""Per-item LoRA training: one low-rank update of the target modules, trained on the item's passage.

LoRA is attached with forward hooks (out += scale · x Aᵀ Bᵀ), initialised as PEFT does (A Kaiming-uniform,
B zero), and optimised with AdamW; the result is an `Update` that saves as a PEFT adapter directory.

A passage is trained as a list of sequences: one per line, each cut into windows of `max_tokens`. An epoch
is one optimizer step per sequence, in order (batch size 1, as a plain fine-tuning loop over documents).

Two routes give the same updates (tested against PEFT): the plain one runs the full model every step; the
cached one (`train_loras`, with an `Engine`) runs the frozen layers below the adapted one once per passage and
trains several passages in one batch, each row with its own factors. AdamW is elementwise and the batch loss
is the sum of per-row losses, so every row trains exactly as it would alone.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mergeability.models import get_module
from mergeability.updates import Dense, LowRank, Update


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 64  # LoRA r (paper Table A.3)
    alpha: float = 128.0  # LoRA alpha: scale = alpha / r
    lr: float = 4e-3  # AdamW learning rate, no weight decay
    epochs: int = 10  # passes over the passage; one AdamW step per sequence (line) of the passage
    max_tokens: int = 256  # longer lines are cut into windows of this many tokens
    update: str = "lora"  # lora | full: a dense ΔW of each target module (paper A.8), zero-initialised


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean token cross-entropy over the last epoch
    passage_ppl: float  # perplexity of the passage under the base model
    passage_tokens: int


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


@contextlib.contextmanager
def lora_hooks(model: nn.Module, factors: dict[str, tuple[Tensor, ...]], scale: float) -> Iterator[None]:
    """Add scale · x Aᵀ Bᵀ to each module's output. Factors are (r, in)/(out, r), or batched per row
    as (b, r, in)/(b, out, r); a one-tensor entry (D,) is a dense ΔW, (out, in) or (b, out, in), added unscaled."""
    handles = []

    def hook(A, B=None):
        if B is None:
            return lambda mod, inp, out: out + (inp[0] @ A.T if A.dim() == 2 else torch.bmm(inp[0], A.transpose(1, 2)))
        if A.dim() == 2:
            return lambda mod, inp, out: out + scale * ((inp[0] @ A.T) @ B.T)
        return lambda mod, inp, out: out + scale * torch.bmm(torch.bmm(inp[0], A.transpose(1, 2)), B.transpose(1, 2))

    for name, f in factors.items():
        handles.append(get_module(model, name).register_forward_hook(hook(*f)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _adamw(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _result(factors, scale, cfg, seed, base_model, row=None) -> Update:
    pick = (lambda t: t.detach().cpu().clone()) if row is None else (lambda t: t[row].detach().cpu().clone())
    mods = {n: Dense(pick(f[0])) if len(f) == 1 else LowRank(pick(f[0]), pick(f[1]), scale) for n, f in factors.items()}
    info = {"update": getattr(cfg, "update", "lora"), "lr": cfg.lr, "epochs": cfg.epochs, "seed": seed}
    if info["update"] == "lora":
        info.update(rank=cfg.rank, alpha=cfg.alpha)
    return Update(mods, base_model, {"training": info})


def train_lora(
    model: nn.Module,
    sequences: Sequence[Tensor],
    modules: Sequence[str],
    cfg: TrainConfig,
    *,
    seed: int,
    key: str,
    base_model: str | None = None,
    engine=None,
) -> tuple[Update, TrainStats]:
    """Train one LoRA update on a passage's sequences (each 1 × T): the cached route with an engine, else plain."""
    if engine is not None:
        return train_loras(engine, [sequences], [key], modules, cfg, seed=seed, base_model=base_model)[0]
    dev = sequences[0].device
    factors = init_params(model, modules, cfg.rank, cfg.update == "full", seed, [key], batched=False, device=dev)
    opt = _adamw([p for ab in factors.values() for p in ab], cfg.lr)
    scale = cfg.alpha / cfg.rank
    n_tok = sum(s.shape[1] - 1 for s in sequences)
    with torch.no_grad():
        base_nll = sum(model(s, labels=s).loss.item() * (s.shape[1] - 1) for s in sequences)
    with lora_hooks(model, factors, scale), torch.enable_grad():
        for _ in range(cfg.epochs):
            last = 0.0
            for ids in sequences:
                loss = model(ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last += loss.item() * (ids.shape[1] - 1)
    stats = TrainStats(loss=last / n_tok, passage_ppl=math.exp(base_nll / n_tok),
                       passage_tokens=sum(s.shape[1] for s in sequences))
    return _result(factors, scale, cfg, seed, base_model), stats


def train_loras(
    engine,
    passages: Sequence[Sequence[Tensor]],
    keys: Sequence[str],
    modules: Sequence[str],
    cfg: TrainConfig,
    *,
    seed: int,
    base_model: str | None = None,
) -> list[tuple[Update, TrainStats]]:
    """Train one LoRA per passage, all in one batch (row b = passage b), from the engine's cached lower layers.

    Passages must have the same number of sequences: step j of an epoch trains every row on its sequence j.
    """
    from mergeability.engine import attention_bias

    model, dev = engine.model, engine.device
    n_seq = {len(p) for p in passages}
    if len(n_seq) != 1:
        raise ValueError("train_loras needs passages with equal numbers of sequences: group them first")
    n = len(passages)
    steps = []  # per sequence index j: (ids, labels, pos, bias, cached h, tokens per row)
    for j in range(n_seq.pop()):
        seqs = [p[j][0] for p in passages]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(n, T, dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            labels[b, : len(s)] = s
        ids, labels = ids.to(dev), labels.to(dev)
        pos = torch.arange(T, device=dev).expand(n, T)
        # None lets attention use its fused causal kernel when no row is padded.
        bias = None if all(len(s) == T for s in seqs) else attention_bias(
            [torch.full((len(s),), -1) for s in seqs], T, engine.dtype).to(dev)
        with torch.no_grad():
            h = engine.lower(ids, pos, bias)  # the frozen part of every step on this sequence, once
        steps.append((labels, pos, bias, h, (labels[:, 1:] != -100).sum(1)))

    def row_losses(labels, pos, bias, h, n_tok):
        logits = model.lm_head(engine.upper(h, pos, bias)).float()
        V = logits.shape[-1]
        tok = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                          reduction="none").view(n, -1)
        return tok.sum(1), n_tok  # summed NLL per row, tokens per row

    with torch.no_grad():
        base = [row_losses(*st) for st in steps]
    n_tok = sum(t for _, t in base).cpu()
    base_nll = sum(l for l, _ in base).cpu()

    factors = init_params(model, modules, cfg.rank, cfg.update == "full", seed, keys, batched=True, device=dev)
    opt = _adamw([p for ab in factors.values() for p in ab], cfg.lr)
    scale = cfg.alpha / cfg.rank
    with lora_hooks(model, factors, scale), torch.enable_grad():
        for _ in range(cfg.epochs):
            last = torch.zeros(n)
            for st in steps:
                nll, tok = row_losses(*st)
                opt.zero_grad(set_to_none=True)
                (nll / tok).sum().backward()  # each row's mean loss: its gradient is what it would be alone
                opt.step()
                last += nll.detach().cpu()
    return [
        (_result(factors, scale, cfg, seed, base_model, row=b),
         TrainStats(loss=(last[b] / n_tok[b]).item(), passage_ppl=math.exp((base_nll[b] / n_tok[b]).item()),
                    passage_tokens=sum(s.shape[1] for s in passages[b])))
        for b in range(n)
    ]


# ---------------------------------------------------------------- task adapters (Lots-of-LoRAs style)


@dataclass(frozen=True)
class TaskTrainConfig:
    rank: int = 16  # Lots-of-LoRAs adapters: r = 16
    alpha: float = 32.0
    lr: float = 2e-3  # AdamW, no weight decay
    epochs: int = 3  # passes over the train split
    batch_size: int = 8  # examples per step


def task_batches(tokenizer, examples, batch_size: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(ids, attention mask, labels) per step: prompt + ' ' + first reference + EOS, right-padded; labels are
    -100 on the prompt and the padding, so the loss is on the answer only."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for s in range(0, len(examples), batch_size):
        rows = []
        for e in examples[s : s + batch_size]:
            p = tokenizer(e.input).input_ids
            a = tokenizer(" " + e.outputs[0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rows.append((p + a, len(p)))
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, (seq, n_prompt) in enumerate(rows):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            labels[b, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        out.append((ids, mask, labels))
    return out


def shared_prefix(ids: Tensor, labels: Tensor) -> int:
    """Length of the token prefix every row shares, stopping at least one token before any row's answer
    (the prompts of a task share its definition and examples: most of every sequence)."""
    from mergeability.exact_match import common_prefix

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
        from transformers import DynamicCache

        cache = DynamicCache()
        body(input_ids=ids[:1, :P], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(ids))
        pos = torch.arange(P, ids.shape[1], device=ids.device).expand(len(ids), -1)
        h = body(input_ids=ids[:, P:], attention_mask=mask, past_key_values=cache, position_ids=pos,
                 use_cache=True).last_hidden_state[:, :-1]
    else:
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, P + 1 :]
    keep = target != -100
    logits = model.get_output_embeddings()(h[keep]).float()
    return nn.functional.cross_entropy(logits, target[keep])


def _answer_steps(model: nn.Module, tokenizer, examples, batch_size: int) -> tuple[list[tuple], list[int]]:
    """The batches of `task_batches` on the model's device, and the answer tokens each one scores."""
    dev = next(model.parameters()).device
    steps = [tuple(t.to(dev) for t in b) for b in task_batches(tokenizer, examples, batch_size)]
    return steps, [int((lab[:, 1:] != -100).sum()) for _, _, lab in steps]


@torch.no_grad()
def _answer_nll(model: nn.Module, steps, n_ans, plain: bool) -> float:
    return sum(answer_loss(model, *st, plain=plain).item() * n for st, n in zip(steps, n_ans))


def answer_perplexity(model: nn.Module, tokenizer, examples, batch_size: int = 8) -> float:
    """Perplexity of the first references given their prompts, under the model as it is (a difficulty feature)."""
    steps, n_ans = _answer_steps(model, tokenizer, examples, batch_size)
    return math.exp(_answer_nll(model, steps, n_ans, plain=False) / sum(n_ans))


def train_task_lora(
    model: nn.Module,
    tokenizer,
    examples,
    modules: Sequence[str],
    cfg: TaskTrainConfig,
    *,
    seed: int,
    key: str,
    base_model: str | None = None,
    plain: bool = False,
    on_step=None,
) -> tuple[Update, TrainStats]:
    """One LoRA update for a task: `epochs` passes over its training examples in fixed order, `batch_size` a step.
    TrainStats: last epoch's loss, the base model's perplexity on the answers, the mean prompt length."""
    steps, n_ans = _answer_steps(model, tokenizer, examples, cfg.batch_size)
    factors = init_params(model, modules, cfg.rank, False, seed, [key], batched=False, device=steps[0][0].device)
    opt = _adamw([p for ab in factors.values() for p in ab], cfg.lr)
    scale = cfg.alpha / cfg.rank
    base_nll = _answer_nll(model, steps, n_ans, plain)
    with lora_hooks(model, factors, scale), torch.enable_grad():
        for _ in range(cfg.epochs):
            last = 0.0
            for st, n in zip(steps, n_ans):
                loss = answer_loss(model, *st, plain=plain)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last += loss.item() * n
                if on_step is not None:
                    on_step()
    prompt_tokens = sum(int(m.sum()) for _, m, _ in steps) - sum(n_ans)
    meta_cfg = TrainConfig(rank=cfg.rank, alpha=cfg.alpha, lr=cfg.lr, epochs=cfg.epochs)
    stats = TrainStats(loss=last / sum(n_ans), passage_ppl=math.exp(base_nll / sum(n_ans)),
                       passage_tokens=round(prompt_tokens / len(examples)))
    return _result(factors, scale, meta_cfg, seed, base_model), stats
