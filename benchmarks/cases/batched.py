"""Batched decoding (`gptcli sample`'s rows): greedy decoding of the-verdict's first lines at each
batch size; aggregate tokens/s and useful FLOP/s against the fp32 matmul peak; then the same with
bf16, int8 and int4 weights at batch 1 and the largest batch."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from benchmarks.cases.common import random_gpt2, verdict_lines
from benchmarks.harness import Row, Suite, Target, interleaved, log
from benchmarks.plan import matmul_params

if TYPE_CHECKING:
    from gptcli.model import GPT


def _decoder(model: GPT, prompts: list[list[int]], tokens: int, outputs: dict[str, list[list[int]]],
             size: int, count: int) -> Callable[[], float]:
    """A call decoding the first `count` prompts at batch `size`; keeps the tokens in outputs["batch <size>"]."""
    from gptcli.batched import decode_batch
    from gptcli.generate import DecodeSettings

    settings = DecodeSettings(max_new_tokens=tokens, stop_at_eos=False)

    def decode() -> float:
        rows = prompts[:count]
        done = {e.row: e.generation.token_ids for e in decode_batch(model, rows, settings, batch_size=size)
                if e.generation is not None}
        outputs[f"batch {size}"] = [done[i] for i in range(len(rows))]
        return sum(len(t) for t in done.values())

    return decode


def _flops_per_token(model: GPT, prompts: list[list[int]], tokens: int) -> float:
    """Useful work per generated token: its own step and its share of its row's prompt (the
    prefill), 2 FLOPs per weight that multiplies, plus attention over the average context."""
    config = model.config
    avg_prompt = statistics.mean(len(p) for p in prompts)
    tokens_per_new = 1 + avg_prompt / tokens
    avg_context = avg_prompt + tokens / 2
    return tokens_per_new * (2 * matmul_params(config) + 4 * config.n_layers * config.emb_dim * avg_context)


def _targets(suite: Suite, by_name: dict[str, Row], flops: float) -> None:
    for b, goal in ((4, 3.0), (16, 6.0)):
        if f"gptcli batch {b}" in by_name:
            suite.targets.append(Target(f"batched: batch {b} / batch 1", by_name[f"gptcli batch {b}"].ratio, goal))
    if "gptcli batch 32" in by_name:
        share = by_name["gptcli batch 32"].median * flops / 1e9 / suite.peaks["fp32_gflops"]
        suite.targets.append(Target("batched: batch 32 useful FLOP/s / fp32 matmul peak", share, 0.5))


def batched(suite: Suite) -> None:
    """Greedy decoding of the-verdict's first lines, `batch_tokens` each, at each batch size:
    aggregate tokens/s, and useful FLOP/s (2 per weight that multiplies, per token) against the
    fp32 matmul peak. Batch b decodes max(4 b, 4) of the prompts (up to all of them): the rate is
    steady once the batch is full, and batch 1 over all 64 would take minutes."""
    from gptcli.batched import decode_batch
    from gptcli.generate import DecodeSettings

    plan = suite.plan
    model = random_gpt2(plan.tiny)
    prompts = [p[: model.config.context_length // 2] for p in verdict_lines(plan.batch_prompts)]  # --tiny: ctx 128
    outputs: dict[str, list[list[int]]] = {}
    fns = {f"batch {b}": _decoder(model, prompts, plan.batch_tokens, outputs, b, min(len(prompts), max(4 * b, 4)))
           for b in plan.batch_sizes}
    case = f"batched greedy, {plan.batch_tokens} tokens/row"
    log(f"  {case}: {', '.join(fns)}")
    warm = DecodeSettings(max_new_tokens=2, stop_at_eos=False)
    list(decode_batch(model, prompts[:4], warm, batch_size=4))  # warm-up: kernels, allocator
    rates = interleaved(fns, plan.batch_reps, 0)
    flops = _flops_per_token(model, prompts, plan.batch_tokens)
    peak = suite.peaks["fp32_gflops"]
    reference = outputs["batch 1"]
    rows = []
    for name, values in rates.items():
        gflops = statistics.median(values) * flops / 1e9
        same = outputs[name][: len(reference)] == reference  # the rows batch 1 decoded
        rows.append(Row(case, f"gptcli {name}", values, "tokens/s",
                        extra=f"{gflops:.0f} GFLOP/s = {gflops / peak:.0%} of fp32 peak",
                        note=("same tokens as batch 1" if same else "TOKENS DIFFER from batch 1")
                        + f"; load {os.getloadavg()[0]:.1f}"))
    _targets(suite, suite.add(rows, "gptcli batch 1"), flops)
    batched_dtypes(suite, model, prompts)


def batched_dtypes(suite: Suite, fp32: GPT, prompts: list[list[int]]) -> None:
    """Batch 1 against the largest batch size with bf16, int8 and int4 weights (one case each)."""
    import copy

    import torch

    from gptcli.quantize import quantize_model

    plan = suite.plan
    sizes = (1, max(plan.batch_sizes))
    for dtype in ("bf16", "int8", "int4"):
        model = (copy.deepcopy(fp32).to(torch.bfloat16) if dtype == "bf16"
                 else quantize_model(copy.deepcopy(fp32), bits=dtype))
        outputs: dict[str, list[list[int]]] = {}
        fns = {f"{dtype} batch {b}": _decoder(model, prompts, plan.batch_tokens, outputs, b,
                                              min(len(prompts), max(4 * b, 4))) for b in sizes}
        case = f"batched greedy {dtype}, {plan.batch_tokens} tokens/row"
        log(f"  {case}")
        rates = interleaved(fns, plan.batch_reps, 1)
        alone = outputs[f"batch {sizes[0]}"]
        rows = []
        for name, values in rates.items():
            same = outputs[name.split(" ", 1)[1]][: len(alone)] == alone
            note = ("same tokens as batch 1" if same else "tokens differ from batch 1 (rounding)")
            rows.append(Row(case, f"gptcli {name}", values, "tokens/s", note=f"{note}; load {os.getloadavg()[0]:.1f}"))
        by_name = suite.add(rows, f"gptcli {dtype} batch 1")
        top = by_name[f"gptcli {dtype} batch {sizes[1]}"]
        suite.targets.append(Target(f"batched {dtype}: batch {sizes[1]} / batch 1", top.ratio, 1.0))


def run(suite: Suite) -> None:
    log("batched decoding")
    batched(suite)
