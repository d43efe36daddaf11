"""Generation: greedy decoding after "Every effort moves you", never stopping early: the chapter's
uncached `generate_text`, gptcli's KV-cached `generate` and transformers' `generate` (when installed),
in fp32 and bf16; tokens/s against the bound of reading every weight once per token."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Row, Suite, Target, interleaved, log, recording
from benchmarks.plan import PROMPT, weight_bytes


def generators(models: dict[str, Any], prompt: torch.Tensor, n: int) -> dict[str, Callable[[], list[int]]]:
    """Greedy decoding of `n` tokens after `prompt` by each implementation in `models`, as calls that
    return the new tokens: the chapter's loop, gptcli's `generate`, and Hugging Face's when loaded."""
    from benchmarks.chapter import generate_text
    from gptcli.generate import generate as gptcli_generate
    from gptcli.kernels.decoding import PackedWeights

    def gptcli_fn(model: Any) -> Callable[[], list[int]]:
        scope = PackedWeights()  # packed once per model, as one `sample` run does for all its prompts

        def run() -> list[int]:
            with scope:
                return gptcli_generate(model, prompt, max_new_tokens=n, stop_at_eos=False)[0]
        return run

    def hf_fn(model: Any) -> Callable[[], list[int]]:
        def run() -> list[int]:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
            return out[0, prompt.shape[1]:].tolist()
        return run

    def chapter_run() -> list[int]:
        context = models["config"].context_length
        return generate_text(models["chapter"], prompt, n, context)[0, prompt.shape[1]:].tolist()

    fns = {"chapter": chapter_run, "gptcli": gptcli_fn(models["gptcli"])}
    if "hf" in models:
        fns["hf"] = hf_fn(models["hf"])
    fns["gptcli bf16"] = gptcli_fn(models["gptcli bf16"])
    if "hf bf16" in models:
        fns["hf bf16"] = hf_fn(models["hf bf16"])
    return fns


def _rows(suite: Suite, models: dict[str, Any], case: str, rates: dict[str, list[float]],
          outputs: dict[str, list[int]]) -> list[Row]:
    """A row per implementation: the share of the read-bandwidth bound, and whether its tokens match."""
    read = suite.peaks.get("read_gbps")
    rows = []
    for name in rates:
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        extra = ""
        if read:
            bound = read * 1e9 / weight_bytes(models["config"], dtype)
            extra = f"{statistics.median(rates[name]) / bound:.0%} of {bound:.0f}/s bound"
        same = "" if name == "chapter" or name.endswith("bf16") else (
            "same tokens as chapter" if outputs[name] == outputs["chapter"] else "TOKENS DIFFER from chapter")
        rows.append(Row(case, name, rates[name], "tokens/s", extra=extra, note=same))
    return rows


def _targets(suite: Suite, n: int, by_name: dict[str, Row]) -> None:
    g = by_name["gptcli"].median
    suite.targets.append(Target(f"generate {n}: gptcli / chapter", g / by_name["chapter"].median, 15))
    if "hf" in by_name:
        suite.targets.append(Target(f"generate {n}: gptcli / hf (fp32)", g / by_name["hf"].median, 2))
    suite.targets.append(Target(f"generate {n}: gptcli bf16 / gptcli fp32", by_name["gptcli bf16"].median / g, 1.5))


def generation(suite: Suite, models: dict[str, Any]) -> None:
    """Each length in `gen_tokens`, the implementations interleaved; targets at the longest."""
    prompt = torch.tensor([PROMPT])
    for fn in generators(models, prompt, 4).values():  # warm-up: kernels, allocator, HF's generation set-up
        fn()
    longest = max(suite.plan.gen_tokens)
    for n in suite.plan.gen_tokens:
        case = f"generate {n} tokens"
        fns = generators(models, prompt, n)
        outputs: dict[str, list[int]] = {}
        reps = suite.plan.gen_reps_long if n == longest else suite.plan.gen_reps
        log(f"  {case}: {', '.join(fns)} ({reps} repetitions)")
        rates = interleaved({name: recording(outputs, name, fn, n) for name, fn in fns.items()}, reps, 0)
        by_name = suite.add(_rows(suite, models, case, rates, outputs), "chapter")
        if n == longest:
            _targets(suite, n, by_name)
