"""Decoding precisions: single-stream greedy decoding in fp32, bf16, int8 and int4, interleaved, against
the bound of reading each one's weights once per token, and int8's and int4's perplexity against fp32's."""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from benchmarks.cases.common import random_gpt2, verdict_tokens
from benchmarks.harness import Row, Suite, Target, interleaved, log
from benchmarks.plan import PROMPT, matmul_params, weight_bytes

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.model import GPT


def _rows(suite: Suite, case: str, config: GPTConfig, rates: dict[str, list[float]]) -> list[Row]:
    bytes_per = {"fp32": weight_bytes(config, torch.float32), "bf16": weight_bytes(config, torch.bfloat16),
                 "int8": matmul_params(config), "int4": matmul_params(config) * (0.5 + 4 / 32)}  # + bf16 scale, offset
    read = suite.peaks.get("read_gbps")
    rows = []
    for name, values in rates.items():
        extra = ""
        if read:
            bound = read * 1e9 / bytes_per[name]
            extra = f"{statistics.median(values) / bound:.0%} of {bound:.0f}/s bound"
        rows.append(Row(case, f"gptcli {name}", values, "tokens/s", extra=extra,
                        note=f"load {os.getloadavg()[0]:.1f}"))
    return rows


def dtypes(suite: Suite) -> None:
    """Single-stream greedy decoding in fp32, bf16, int8 and int4, interleaved, and the quantized
    models' perplexity against fp32's on the-verdict (the same random GPT-2 124M weights)."""
    from gptcli.generate import generate as gptcli_generate
    from gptcli.kernels.decoding import PackedWeights
    from gptcli.quantize import quantize_model
    from gptcli.runtime import bf16_is_native

    fp32 = random_gpt2(suite.plan.tiny)
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
              "int8": quantize_model(copy.deepcopy(fp32)), "int4": quantize_model(copy.deepcopy(fp32), bits="int4")}
    n = suite.plan.dtype_tokens
    prompt = torch.tensor([PROMPT])

    def run(model: GPT) -> Callable[[], float]:
        scope = PackedWeights()  # packed once per model, as one `sample` run does for all its prompts

        def decode() -> float:
            with scope:
                return len(gptcli_generate(model, prompt, max_new_tokens=n, stop_at_eos=False)[0])
        return decode

    case = f"decode {n} tokens by dtype"
    log(f"  {case}")
    rates = interleaved({name: run(m) for name, m in models.items()}, suite.plan.dtype_reps, 1)
    by_name = suite.add(_rows(suite, case, fp32.config, rates), "gptcli fp32")
    suite.targets.append(Target(f"decode {n}: int8 / fp32", by_name["gptcli int8"].ratio, 2.0))
    int4_over_int8 = by_name["gptcli int4"].median / by_name["gptcli int8"].median
    suite.targets.append(Target(f"decode {n}: int4 / int8", int4_over_int8, 1.0))
    if bf16_is_native("cpu"):
        suite.targets.append(Target(f"decode {n}: bf16 / fp32 (native bf16)", by_name["gptcli bf16"].ratio, 1.5))
    quantized_perplexity(suite, models)


def quantized_perplexity(suite: Suite, models: dict[str, GPT]) -> None:
    from gptcli.evaluate import perplexity, sliding_window_loss

    tokens = verdict_tokens()[: suite.plan.dtype_eval_tokens]
    with torch.inference_mode():
        ppl = {name: perplexity(sliding_window_loss(models[name], tokens, batch_size=2)[0])
               for name in ("fp32", "int8", "int4")}
    for name, bound in (("int8", 0.01), ("int4", 0.03)):
        change = abs(ppl[name] - ppl["fp32"]) / ppl["fp32"]
        suite.notes.append(f"{name} perplexity on the-verdict's first {len(tokens)} tokens (random 124M weights): "
                           f"{ppl[name]:.2f} vs fp32 {ppl['fp32']:.2f} ({change:.3%} apart)")
        suite.targets.append(Target(f"{name} perplexity: relative change vs fp32", change, bound, at_most=True))


def run(suite: Suite) -> None:
    log("decoding precisions")
    dtypes(suite)
