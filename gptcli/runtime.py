"""Where and in which precision models run: `--device` and `--dtype` for every command."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, get_args

from gptcli.choices import InferenceDtype, Precision
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


INFERENCE_DTYPES: tuple[str, ...] = get_args(InferenceDtype)
"""`--dtype` of sample and eval: auto picks bf16 where it is native (see `bf16_is_native`), else fp32;
int8 is weight-only int8 with per-output-channel scales, int4 weight-only 4-bit with a scale and
offset per 32 inputs (gptcli.quantize)."""

TRAIN_PRECISIONS: tuple[str, ...] = get_args(Precision)

BF16_ENV = "GPTCLI_CPU_BF16"
"""Set to 0 or 1 to override the detection of native bf16 on the CPU (tests simulate CPUs with it)."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty elsewhere."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()  # noqa: SIM115
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively: AVX512_BF16 or AMX on x86, BF16 on ARM (where
    torch's bf16 matmuls run at full speed; without it they emulate, up to 30x slower than fp32
    in training). `GPTCLI_CPU_BF16=0/1` overrides."""
    override = os.environ.get(BF16_ENV)
    if override in ("0", "1"):
        return override == "1"
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    if not flags:  # no /proc/cpuinfo (macOS, Windows): what torch's kernels were dispatched to
        import torch

        return "AMX" in torch.backends.cpu.get_cpu_capability()
    return False


def bf16_is_native(device: str) -> bool:
    """Whether bf16 is at least as fast as fp32 on `device` (cpu, cuda or mps)."""
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device == "cpu":
        return cpu_has_native_bf16()
    return False  # mps: fp32 is the safe choice for `auto`


def resolve_precision(
    name: str, device: str, strict: bool = False, option: str = "--dtype", one_row: bool = False
) -> tuple[str, str | None]:
    """The precision that will run for `name` (auto, fp32, bf16, int8, int4) on `device`, and a one-line note
    when it differs from the request. bf16 where it is not native runs fp32 (with the note), or is a
    usage error with `strict` (--strict-precision).

    `one_row`: the work is decoding one row at a time. Without native bf16 a CPU still decodes one
    row 2-4x faster in bf16 than in fp32 (oneDNN's prepacked bf16 weights halve the bytes read; measured
    with oneDNN held to AVX2), while batched steps and full forward passes ran 2.4-2.7x slower: so
    bf16 is kept for one row, and falls back otherwise."""
    if name not in INFERENCE_DTYPES:
        raise UsageError(f"{option} must be one of {', '.join(INFERENCE_DTYPES)}, got {name!r}")
    if name == "auto":
        return ("bf16" if bf16_is_native(device) else "fp32"), None
    if name != "bf16" or bf16_is_native(device) or (one_row and device == "cpu"):
        return name, None
    where = "this CPU has no native bf16 (AVX512_BF16, AMX or ARM BF16)" if device == "cpu" else (
        f"bf16 is not native on {device}")
    if strict:
        raise UsageError(f"{option} bf16: {where}, so it would be slower than fp32; leave out --strict-precision "
                         "to run fp32 instead")
    return "fp32", f"{option} bf16: {where}, where it is slower than fp32; running fp32 (--strict-precision refuses)"


def resolve_dtype(name: str) -> torch.dtype:
    """Weights' dtype for a resolved precision: fp32, or bf16 (half the memory traffic). int8 and int4
    models load in fp32 and are quantized after (gptcli.quantize)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32, "int4": torch.float32}
    if name not in dtypes:
        raise UsageError(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {name!r}")
    return dtypes[name]


def set_threads(threads: int | None) -> None:
    """`--threads N`: torch's intra-op threads (default: torch's choice, one per core). Fewer leaves
    cores to other work; on a busy machine it can also be faster than oversubscribing."""
    from gptcli.limits import check_threads

    check_threads(threads)  # before torch, whose thread pools take a C int
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
