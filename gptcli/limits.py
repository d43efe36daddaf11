"""Resource limits, checked before anything is allocated: the memory a command will need, estimated
from its options, against the memory the machine has. What cannot fit is refused with one line
(exit 2) naming the estimate and the override (`--ignore-memory-check`), instead of a traceback deep
in torch or a process that grows until the kernel kills it.

The estimates are deliberately simple upper-bound-ish sums (weights, optimizer state, activations,
key/value caches); their job is to catch the absurd (2**40 layers, a million beams), not to predict
the last megabyte.
"""

from __future__ import annotations

import math
import os

from gptcli.config import GPTConfig, parameter_counts
from gptcli.errors import UsageError

OVERRIDE = "--ignore-memory-check"
MAX_THREADS = 4096  # torch's thread pools take an int; far beyond any machine, far below a typo


def available_memory() -> int:
    """Bytes the process may still use: MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: check nothing


def model_bytes(config: GPTConfig, bytes_per_weight: float = 4) -> int:
    return math.ceil(parameter_counts(config)["total"] * bytes_per_weight)


def training_bytes(config: GPTConfig, micro_batch: int) -> int:
    """fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), plus activations:
    per layer about 34·T·C + 5·H·T² values of 4 bytes (Korthikanti et al.'s count), and the logits."""
    t, c, h = config.context_length, config.emb_dim, config.n_heads
    per_layer = 34 * t * c + 5 * h * t * t
    activations = micro_batch * (config.n_layers * per_layer + 2 * t * config.vocab_size) * 4
    return 4 * model_bytes(config) + activations


def decoding_bytes(config: GPTConfig, rows: int, length: int, bytes_per_weight: float = 4) -> int:
    """The weights plus a key/value cache of `rows` sequences of `length` tokens, and their logits."""
    cache = 2 * config.n_layers * rows * length * config.emb_dim * 4
    return model_bytes(config, bytes_per_weight) + cache + rows * config.vocab_size * 4


def check_memory(needed: int, what: str, ignore: bool = False) -> None:
    """Refuse `what` when it needs more than the machine has (unless the user overrides)."""
    if ignore:
        return
    available = available_memory()
    if needed > available:
        raise UsageError(
            f"{what} needs about {_size(needed)} of memory, more than this machine has available "
            f"({_size(available)}); make it smaller, or pass {OVERRIDE} to try anyway"
        )


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


def _size(num_bytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes:,} bytes"
