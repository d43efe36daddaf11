"""What exact dropout costs: gptcli training steps with `--dropout-rng exact` against `fast`, at
GPT-2 124M shapes (context 256, batch 2, dropout 0.1: the chapter's run), interleaved in one
process on one model (ABBA order, so drift and load changes fall on both alike).

    .venv/bin/python -m benchmarks.dropout_cost [--pairs 4] [--threads N]

Prints one JSON object: median step seconds per mode, the exact/fast speed ratio, the mask
elements drawn per step and the CPU's flags and load average."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from gptcli.config import get_preset
from gptcli.kernels import set_dropout_rng
from gptcli.kernels.dropout import drop_mask
from gptcli.model import GPT
from gptcli.optim import adamw


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return sorted(wanted & set(text.split()))


def mask_elements(batch: int, context: int, emb: int, heads: int, layers: int) -> int:
    """Dropout mask elements drawn per forward pass: embedding, then per block the attention
    weights and two residuals."""
    return batch * context * emb + layers * (batch * heads * context * context + 2 * batch * context * emb)


def draw_seconds(elements: int, rng: str) -> float:
    """Seconds to draw `elements` mask elements (best of three)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        drop_mask((elements,), 0.1, torch.device("cpu"), rng)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_preset("124M").replace(context_length=args.context, drop_rate=0.1)
    torch.manual_seed(123)
    model = GPT(config).train()
    optimizer = adamw(model.parameters(), lr=4e-4, weight_decay=0.1)
    x = torch.randint(0, config.vocab_size, (args.batch, args.context))
    y = torch.randint(0, config.vocab_size, (args.batch, args.context))

    def step(rng: str) -> tuple[float, float]:
        set_dropout_rng(model, rng)  # type: ignore[arg-type]
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        model(x, targets=y).backward()
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu

    step("exact"), step("fast")  # warm up allocator and kernels
    times: dict[str, list[tuple[float, float]]] = {"exact": [], "fast": []}
    for i in range(args.pairs):
        order = ("exact", "fast") if i % 2 == 0 else ("fast", "exact")
        for rng in order:
            times[rng].append(step(rng))
    wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    elements = mask_elements(args.batch, args.context, config.emb_dim, config.n_heads, config.n_layers)
    print(json.dumps({
        "exact_step_s": round(wall["exact"], 3), "fast_step_s": round(wall["fast"], 3),
        "exact_speed_over_fast": round(wall["fast"] / wall["exact"], 3),
        "exact_step_cpu_s": round(cpu["exact"], 3), "fast_step_cpu_s": round(cpu["fast"], 3),
        "exact_speed_over_fast_cpu": round(cpu["fast"] / cpu["exact"], 3),
        "steps_s": {k: [round(t, 2) for t, _ in v] for k, v in times.items()},
        "mask_elements_per_step": elements,
        "mask_draw_s": {rng: round(draw_seconds(elements, rng), 3) for rng in ("exact", "fast")},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_flags": cpu_flags(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
