"""Evaluation throughput: the loss over random token windows, the chapter's `calc_loss_batch` loop
against `gptcli.evaluate.sliding_window_loss` (what `gptcli eval` runs) in fp32 and bf16."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Row, Suite, interleaved, log
from benchmarks.plan import matmul_params

BATCH_SIZE = 2


def _chapter(models: dict[str, Any], tokens: torch.Tensor, losses: dict[str, float]) -> Callable[[], float]:
    from benchmarks.chapter import calc_loss_batch

    ctx = models["config"].context_length
    windows = (len(tokens) - 1) // ctx
    x = tokens[:-1].view(windows, ctx)
    y = tokens[1:].view(windows, ctx)

    def run() -> float:
        total = 0.0
        with torch.no_grad():
            for i in range(0, windows, BATCH_SIZE):
                total += calc_loss_batch(x[i:i + BATCH_SIZE], y[i:i + BATCH_SIZE], models["chapter"], "cpu").item()
        losses["chapter"] = total / -(-windows // BATCH_SIZE)
        return windows * ctx

    return run


def _gptcli(models: dict[str, Any], name: str, tokens: torch.Tensor, losses: dict[str, float]) -> Callable[[], float]:
    from gptcli.evaluate import sliding_window_loss

    def run() -> float:
        losses[name], count = sliding_window_loss(models[name], tokens.numpy(), batch_size=BATCH_SIZE)
        return count

    return run


def evaluation(suite: Suite, models: dict[str, Any]) -> None:
    """`eval_windows` windows of the full context, interleaved; tokens/s and MFU."""
    config = models["config"]
    ctx = config.context_length
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (suite.plan.eval_windows * ctx + 1,), generator=g)
    losses: dict[str, float] = {}
    case = f"eval (ctx {ctx}, batch {BATCH_SIZE})"
    log(f"  {case}")
    fns = {"chapter": _chapter(models, tokens, losses), "gptcli": _gptcli(models, "gptcli", tokens, losses),
           "gptcli bf16": _gptcli(models, "gptcli bf16", tokens, losses)}
    rates = interleaved(fns, suite.plan.eval_reps, 1)
    flops = 2 * matmul_params(config) + 4 * config.n_layers * config.emb_dim * ctx
    rows = []
    for name, values in rates.items():
        peak = suite.peaks["bf16_gflops" if name.endswith("bf16") else "fp32_gflops"]
        mfu = statistics.median(values) * flops / 1e9 / peak
        rows.append(Row(case, name, values, "tokens/s", extra=f"MFU {mfu:.0%}", note=f"loss {losses[name]:.3f}"))
    suite.add(rows, "chapter")
