"""gptcli's benchmark suite: training, memory, evaluation, generation, `prepare` and start-up time,
against the chapter's code, Hugging Face transformers (when installed) and a nanoGPT-style model.

    python benchmarks/run.py --quick               # a few minutes; one table
    python benchmarks/run.py                       # the full run (about half an hour on 2 cores)
    python benchmarks/run.py --quick --json out.json --threads 2

Method. Every implementation of a case is measured in one process, interleaved (A, B, C, A, B,
C ...) after a warm-up, so slow drift (thermal, other processes) hits all of them alike; the table
gives the median and the range (min-max) over the repetitions and the ratio of medians to the
baseline (the chapter's code). Peak memory is the exception: each implementation runs a few
training steps in its own fresh process and reports its peak resident set (ru_maxrss).

Implementations:
- chapter: benchmarks/chapter.py, the chapter's GPTModel (hand-written LayerNorm, GELU and masked
  attention), `calc_loss_batch`, `torch.optim.AdamW` with its defaults, and the uncached
  `generate_text`;
- gptcli: its public API, `gptcli.model.GPT` trained as `gptcli train` trains it (the loss from
  `model(inputs, targets=targets)`, `gptcli.optim.adamw`, `zero_grad(set_to_none=True)`, the loss
  read back every step), `gptcli.generate.generate` (KV-cached greedy decoding) and
  `gptcli.evaluate.sliding_window_loss` (what `gptcli eval` runs);
- hf: transformers' GPT2LMHeadModel with its default attention (SDPA) and the optimizer its Trainer
  uses by default (fused AdamW on torch >= 2.8, weight decay off for biases and LayerNorms), and
  `generate` with its default (dynamic) cache;
- nanogpt: benchmarks/nanogpt.py, nanoGPT's model and `configure_optimizers` (fused AdamW on CUDA
  only, so the per-tensor loop on CPU).

Shapes. Training: GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257) at context 256 with the
chapter's dropout 0.1 and untied head (163M parameters), random token batches. Generation and
evaluation: GPT-2 124M as OpenAI released it (context 1024, qkv bias, tied head), the same random
weights in every implementation, prompt "Every effort moves you", greedy, never stopping early.

Figures of merit. MFU: training FLOP/s over the matmul peak this run measures (a large square
matmul, best of several), with FLOPs per token = 6 N + 12 L C T (N: parameters that multiply,
the embeddings excluded; L layers, C width, T context). Decoding: tokens/s over the bound set by
reading every weight once per token at the memory read bandwidth this run measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.cases.memory import child_memory  # noqa: E402
from benchmarks.harness import Suite, environment, log, report  # noqa: E402
from benchmarks.plan import make_plan  # noqa: E402


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases (a few minutes)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to check that the suite runs (seconds)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH as JSON")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    parser.add_argument("--only", default="train,memory,inference,batched,dtypes,prepare,startup",
                        help="comma-separated cases: train, memory, inference, batched, dtypes, prepare, startup "
                        "(default: all)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args.batch, args.steps, args.tiny)
        return 0

    only = {c.strip() for c in args.only.split(",") if c.strip()}
    suite = Suite(make_plan(args), args.threads)
    env = environment()
    log(f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs ({env['cpu']}, "
        f"{env['capability']}), load average {env['load_average'][0] if env['load_average'] else 'n/a'}")
    if env["load_average"] and env["load_average"][0] > 0.5 * (env["cpus"] or 1):
        suite.notes.append(f"the machine was busy at the start (load average {env['load_average'][0]:.1f} on "
                           f"{env['cpus']} CPUs): figures are noisy")
    started = time.perf_counter()
    suite.measure_peaks()
    for name, case in CASES.items():  # a fixed order: start-up first, before anything warms the caches
        if name in only:
            case(suite)
    report(suite, env, time.perf_counter() - started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
