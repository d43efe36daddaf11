"""Greedy generation speed: gptcli's KV-cached decoding against the chapter's uncached loop.

Both run the same weights (GPT-2 124M shapes, context 1024, the chapter's untied head) from the same
prompt, for the same number of new tokens, interleaved (chapter, gptcli fp32, gptcli bf16, chapter,
...) after a warm-up; the table gives the median and range of tokens/s. The first repetition also
checks that gptcli's fp32 tokens equal the chapter's.

    python benchmarks/generate_bench.py            # 200 new tokens, 3 repetitions (a few minutes)
    python benchmarks/generate_bench.py --quick    # 50 new tokens, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.chapter import GPTModel, config_dict, generate_text, to_gptcli_state_dict  # noqa: E402
from gptcli.config import get_preset  # noqa: E402
from gptcli.generate import generate  # noqa: E402
from gptcli.model import GPT  # noqa: E402

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"


def build(preset: str, context_length: int) -> tuple[GPTModel, GPT, GPT]:
    config = get_preset(preset).replace(context_length=context_length)
    torch.manual_seed(123)
    chapter = GPTModel(config_dict(config)).eval()
    model = GPT(config)
    model.load_state_dict(to_gptcli_state_dict(chapter.state_dict(), config.n_layers))
    model.eval()
    bf16 = GPT(config)
    bf16.load_state_dict(model.state_dict())
    return chapter, model, bf16.to(torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 new tokens, 2 repetitions")
    parser.add_argument("--tokens", type=int, help="new tokens per run (default 200; --quick 50)")
    parser.add_argument("--repeats", type=int, help="timed repetitions (default 3; --quick 2)")
    parser.add_argument("--preset", default="124M", help="model shape (default 124M; tiny for a smoke run)")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    tokens = args.tokens or (50 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    chapter, model, bf16 = build(args.preset, args.context_length)
    prompt = torch.tensor([PROMPT])
    context = args.context_length

    def run_chapter() -> list[int]:
        return generate_text(chapter, prompt, tokens, context)[0, len(PROMPT):].tolist()

    def run_gptcli(m: GPT) -> Callable[[], list[int]]:
        return lambda: generate(m, prompt, max_new_tokens=tokens, stop_at_eos=False)[0]

    cases: dict[str, Callable[[], list[int]]] = {
        "chapter generate_text (uncached, fp32)": run_chapter,
        "gptcli KV cache, fp32": run_gptcli(model),
        "gptcli KV cache, bf16 weights": run_gptcli(bf16),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.preset}, context {context}, {tokens} new tokens, {repeats} repetitions, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}", file=sys.stderr)

    with torch.inference_mode():  # warm-up: allocator, kernels
        generate_text(chapter, prompt, 3, context)
    for case in (model, bf16):
        generate(case, prompt, max_new_tokens=3, stop_at_eos=False)

    seconds: dict[str, list[float]] = {name: [] for name in cases}
    outputs: dict[str, list[int]] = {}
    for rep in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            out = fn()
            seconds[name].append(time.perf_counter() - start)
            if rep == 0:
                outputs[name] = out
            print(f"  rep {rep + 1} {name}: {tokens / seconds[name][-1]:.2f} tokens/s", file=sys.stderr)

    names = list(cases)
    same = outputs[names[1]] == outputs[names[0]]
    base = statistics.median(seconds[names[0]])
    rows = []
    for name in names:
        rates = [tokens / s for s in seconds[name]]
        rows.append({
            "case": name, "median_tokens_per_s": tokens / statistics.median(seconds[name]),
            "min": min(rates), "max": max(rates), "speedup": base / statistics.median(seconds[name]),
        })
    if args.json:
        print(json.dumps({"preset": args.preset, "context_length": context, "new_tokens": tokens,
                          "repeats": repeats, "threads": torch.get_num_threads(), "load_average": load,
                          "fp32_tokens_equal_chapter": same, "results": rows}, indent=2))
        return
    print(f"{'case':40} {'tokens/s (median)':>18} {'range':>16} {'vs chapter':>11}")
    for row in rows:
        print(f"{row['case']:40} {row['median_tokens_per_s']:18.2f} "
              f"{row['min']:7.2f}-{row['max']:<8.2f} {row['speedup']:10.1f}x")
    print(f"gptcli fp32 tokens equal the chapter's: {same}")


if __name__ == "__main__":
    main()
