"""Training throughput: one step (forward, loss, backward, optimizer) of each implementation,
interleaved, in fp32 and under bf16 autocast; tokens/s and MFU against the measured matmul peak.
Beside them, "matmuls only": the step's matrix products alone at their shapes (forward, and both
products of each backward), the rate no implementation built on torch's matmuls can pass."""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.harness import Row, Suite, Target, have_transformers, interleaved, log, recording
from benchmarks.plan import LR, WEIGHT_DECAY, train_config, train_flops_per_token

if TYPE_CHECKING:
    from gptcli.config import GPTConfig

Step = Callable[[torch.Tensor, torch.Tensor, str], float]


def precision_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _stepper(optimizer: torch.optim.Optimizer, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             set_to_none: bool = True) -> Step:
    """A training step: zero the gradients, the loss under `precision`, backward, optimizer step."""

    def step(x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
        if set_to_none:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad()
        with precision_context(precision):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _chapter_trainer(config: GPTConfig) -> Step:
    from benchmarks.chapter import GPTModel, calc_loss_batch, config_dict

    model = GPTModel(config_dict(config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return _stepper(optimizer, lambda x, y: calc_loss_batch(x, y, model, "cpu"), set_to_none=False)


def _gptcli_trainer(config: GPTConfig) -> Step:
    from gptcli.model import GPT
    from gptcli.optim import adamw

    model = GPT(config).train()
    optimizer = adamw(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return _stepper(optimizer, lambda x, y: model(x, targets=y))


def _hf_trainer(config: GPTConfig) -> Step:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=config.drop_rate,
        embd_pdrop=config.drop_rate, attn_pdrop=config.drop_rate, tie_word_embeddings=config.tie_weights,
    )
    model = GPT2LMHeadModel(hf_config).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    fused = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)  # Trainer's default
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, **({"fused": True} if fused else {}),
    )

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return _stepper(optimizer, loss_of)


def _nanogpt_trainer(config: GPTConfig) -> Step:
    from benchmarks.nanogpt import NanoConfig, NanoGPT

    model = NanoGPT(NanoConfig(
        block_size=config.context_length, vocab_size=config.vocab_size, n_layer=config.n_layers,
        n_head=config.n_heads, n_embd=config.emb_dim, dropout=config.drop_rate,
    )).train()
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, (0.9, 0.999), "cpu")
    return _stepper(optimizer, lambda x, y: model(x, y)[1])


TRAINERS: dict[str, Callable[[GPTConfig], Step]] = {
    "chapter": _chapter_trainer, "gptcli": _gptcli_trainer, "hf": _hf_trainer, "nanogpt": _nanogpt_trainer,
}


def build_trainer(name: str, config: GPTConfig) -> Step:
    """One training step of implementation `name`: (inputs, targets, precision) -> loss."""
    torch.manual_seed(123)
    if name not in TRAINERS:
        raise ValueError(f"unknown implementation {name!r}")
    return TRAINERS[name](config)


def train_impls() -> list[str]:
    names = ["chapter", "gptcli"]
    if have_transformers():
        names.append("hf")
    names.append("nanogpt")
    return names


def batch(config: GPTConfig, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.context_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def matmuls_only(config: GPTConfig, size: int, precision: str) -> Callable[[], float]:
    """The products of one training step on `size` rows of the context, nothing else: for every
    linear layer and the output head X @ W^T, dY @ W and dY^T @ X (attention's small batched products
    left out); returns the tokens."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows, emb = size * config.context_length, config.emb_dim
    shapes = [(emb, 3 * emb), (emb, emb), (emb, 4 * emb), (4 * emb, emb)] * config.n_layers
    shapes.append((emb, config.vocab_size))
    g = torch.Generator().manual_seed(0)
    operands = [(torch.randn(rows, i, generator=g, dtype=dtype), torch.randn(o, i, generator=g, dtype=dtype),
                 torch.randn(rows, o, generator=g, dtype=dtype)) for i, o in shapes]

    def run() -> float:
        for x, w, dy in operands:
            torch.nn.functional.linear(x, w)
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
        return float(rows)

    return run


def _measure(suite: Suite, trainers: dict[str, Step], config: GPTConfig, size: int, precision: str) -> None:
    """One case: `trainers` interleaved on a batch of `size` in `precision`, and the matmul floor."""
    x, y = batch(config, size)
    case = f"train {precision} b{size}"
    log(f"  {case}")
    losses: dict[str, float] = {}
    fns = {n: recording(losses, n, functools.partial(step, x, y, precision), x.numel()) for n, step in trainers.items()}
    fns["matmuls only"] = matmuls_only(config, size, precision)
    rates = interleaved(fns, suite.plan.train_reps, suite.plan.train_warmup)
    peak = suite.peaks["bf16_gflops" if precision == "bf16" else "fp32_gflops"]
    flops = train_flops_per_token(config)
    rows = []
    for name in fns:
        mfu = statistics.median(rates[name]) * flops / 1e9 / peak
        note = f"loss {losses[name]:.2f}" if name in losses else "the ceiling: products alone"
        rows.append(Row(case, name, rates[name], "tokens/s", extra=f"MFU {mfu:.0%}", note=note))
    suite.add(rows, "chapter")
    suite.train_rows[(precision, size)] = {r.impl: r for r in rows}


def training(suite: Suite) -> None:
    config = train_config(suite.plan.tiny)
    names = train_impls()
    log(f"training: {', '.join(names)}")
    trainers = {name: build_trainer(name, config) for name in names}
    for size in suite.plan.train_batches:
        for precision in suite.plan.train_precisions:
            _measure(suite, trainers, config, size, precision)
    del trainers
    gc.collect()


def training_targets(suite: Suite) -> None:
    for size in suite.plan.train_batches:
        fp32 = suite.train_rows.get(("fp32", size))
        bf16 = suite.train_rows.get(("bf16", size))
        if fp32:
            chapter = fp32["chapter"].median
            suite.targets.append(Target(f"train fp32 b{size}: gptcli / chapter", fp32["gptcli"].median / chapter,
                                        1.4))
            others = [fp32[n].median for n in ("hf", "nanogpt") if n in fp32]
            if others:
                best = max(others)
                suite.targets.append(Target(f"train fp32 b{size}: gptcli / best of hf, nanogpt",
                                            fp32["gptcli"].median / best, 1.15))
        if fp32 and bf16:
            suite.targets.append(Target(f"train bf16 b{size}: gptcli bf16 / chapter fp32",
                                        bf16["gptcli"].median / fp32["chapter"].median, 2.2))
        if bf16:
            _bf16_targets(suite, size, bf16)


def _bf16_targets(suite: Suite, size: int, bf16: dict[str, Row]) -> None:
    """MFU against the bf16 matmul peak (65% at batch 8, 55% below) and the ratio to HF's bf16 step;
    not applicable (None) where the CPU has no native bf16."""
    from gptcli.runtime import bf16_is_native

    native = bf16_is_native("cpu")
    mfu = bf16["gptcli"].median * train_flops_per_token(train_config(suite.plan.tiny)) / 1e9
    mfu /= suite.peaks["bf16_gflops"]
    goal = 0.65 if size >= 8 else 0.55
    suite.targets.append(Target(f"train bf16 b{size}: gptcli MFU (native bf16)", mfu if native else None, goal))
    if "hf" in bf16:
        ratio = bf16["gptcli"].median / bf16["hf"].median
        suite.targets.append(Target(f"train bf16 b{size}: gptcli / hf", ratio if native else None, 1.3))


def run(suite: Suite) -> None:
    """`--only train`: the throughput cases, then their targets."""
    training(suite)
    training_targets(suite)
