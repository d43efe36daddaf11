"""What one run of benchmarks/run.py measures (the full run, --quick, --tiny) and the shapes it measures."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gptcli.config import GPTConfig

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"
LR, WEIGHT_DECAY = 4e-4, 0.1


@dataclass
class Plan:
    """What one run measures; --quick and --tiny shrink it."""

    train_batches: tuple[int, ...] = (2, 8)
    train_precisions: tuple[str, ...] = ("fp32", "bf16")
    train_reps: int = 5
    train_warmup: int = 1
    memory_batches: tuple[int, ...] = (2, 8)
    memory_steps: int = 3
    memory_reps: int = 3  # fresh processes per implementation (A, B, C, A, B, C ...); the peak varies by ~10%
    memory_all: bool = True  # also hf and nanogpt (else the chapter and gptcli only)
    gen_tokens: tuple[int, ...] = (50, 200)
    gen_reps: int = 5
    gen_reps_long: int = 5  # repetitions for the longest generation (the chapter's takes about a minute)
    eval_windows: int = 4
    eval_reps: int = 5
    help_reps: int = 7
    prepare_mb: int = 100
    peak_size: int = 2048
    bandwidth_mb: int = 512
    batch_sizes: tuple[int, ...] = (1, 4, 16, 32)
    batch_prompts: int = 64  # the-verdict's first non-empty lines
    batch_tokens: int = 100
    batch_reps: int = 2
    dtype_tokens: int = 200
    dtype_reps: int = 3
    dtype_eval_tokens: int = 2049  # int8 vs fp32 perplexity on the-verdict's first tokens
    tiny: bool = False
    notes: list[str] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        return Plan(train_batches=(2,), train_reps=1, memory_batches=(2,), memory_steps=2, memory_reps=1,
                    memory_all=False, gen_tokens=(8,), gen_reps=1, gen_reps_long=1, eval_windows=2, eval_reps=1,
                    help_reps=1, prepare_mb=0, peak_size=256, bandwidth_mb=32, batch_sizes=(1, 4), batch_prompts=6,
                    batch_tokens=6, batch_reps=1, dtype_tokens=8, dtype_reps=1, dtype_eval_tokens=200, tiny=True,
                    notes=["--tiny: tiny shapes, one repetition: checks that the suite runs, no figure means anything"])
    if args.quick:
        return Plan(train_batches=(2,), train_reps=3, memory_batches=(2,), memory_reps=2, memory_all=False,
                    gen_tokens=(50, 200),
                    gen_reps=3, gen_reps_long=1, eval_windows=2, eval_reps=3, help_reps=5, prepare_mb=20,
                    batch_reps=1, dtype_reps=2,
                    notes=["--quick: 3 repetitions (1 for 200-token generation), batch 2 only, peak memory of the "
                           "chapter and gptcli only (2 rounds), 20 MB for prepare"])
    return Plan()


# --- shapes and their FLOPs -----------------------------------------------------------------------


def train_config(tiny: bool) -> GPTConfig:
    from gptcli.config import get_preset

    if tiny:
        return get_preset("tiny").replace(context_length=64)
    return get_preset("124M").replace(context_length=256)


def gpt2_config(tiny: bool) -> GPTConfig:
    from gptcli.config import GPTConfig

    if tiny:
        return GPTConfig(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True,
                         tie_weights=True)
    return GPTConfig(qkv_bias=True, tie_weights=True, drop_rate=0.0)


def matmul_params(config: GPTConfig) -> int:
    """Parameters that take part in a matmul per token: every block's linear layers and the head."""
    c = config.emb_dim
    return config.n_layers * 12 * c * c + config.vocab_size * c


def train_flops_per_token(config: GPTConfig) -> float:
    return 6 * matmul_params(config) + 12 * config.n_layers * config.emb_dim * config.context_length


def weight_bytes(config: GPTConfig, dtype: torch.dtype) -> int:
    element = torch.finfo(dtype).bits // 8
    return matmul_params(config) * element
