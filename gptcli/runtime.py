"""Where and in which precision models run: `--device` and `--dtype` for every command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptcli.errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> str:
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a usage error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no Apple GPU is available")
    return name


def resolve_dtype(name: str) -> torch.dtype:
    """Weights' dtype for inference: fp32 (default) or bf16 (half the memory traffic)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise UsageError(f"--dtype must be fp32 or bf16, got {name!r}")
    return dtypes[name]


def set_threads(threads: int | None) -> None:
    """`--threads N`: torch's intra-op threads (default: torch's choice, one per core). Fewer leaves
    cores to other work; on a busy machine it can also be faster than oversubscribing."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
