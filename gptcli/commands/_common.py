"""Helpers that commands share (commands do not import each other): stdin, the options of running a
model for inference and of printing results (`sample`, `eval`), loading the model, and converting
with a progress bar (`convert`, `fetch gpt2 --convert`). Heavy modules are imported inside the
functions."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import typer

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.convert import ConvertResult
    from gptcli.model import GPT


RUNTIME_PANEL = "Model and runtime"


@dataclass(frozen=True)
class RuntimeOptions:
    """Which model runs where, and how (`sample`, `eval`): --model (a run directory or .safetensors
    file; None: runs/latest), --device, --dtype, --strict-precision, --threads (None: torch's choice),
    --ignore-memory-check (run even when the memory estimate exceeds what the machine has)."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    strict_precision: bool = False
    threads: int | None = None
    ignore_memory_check: bool = False


@dataclass(frozen=True)
class OutputOptions:
    """How a command prints its results: --json (one object per line on stdout, instead of text or a
    table) and --verbose (timings on stderr)."""

    json: bool = False
    verbose: bool = False


class LoadedModel(NamedTuple):
    """A model ready for inference, with what `load_for_inference` resolved."""

    model: GPT
    path: str
    device: str
    precision: str  # the precision that runs: fp32, bf16, int8 or int4


def device_option() -> Any:
    """`--device`, as `sample` and `eval` declare it (train's lives with its settings)."""
    return typer.Option("auto", "--device", rich_help_panel=RUNTIME_PANEL, help="auto: cuda, then mps, then cpu.")


def dtype_option() -> Any:
    return typer.Option(
        "fp32", "--dtype", rich_help_panel=RUNTIME_PANEL,
        help="Weights for inference: fp32, bf16, int8 (weight-only, per-channel scales, quantized at load), int4 "
        "(weight-only, a scale and offset per 32 inputs; fastest decoding on CPU) or "
        "auto (bf16 on CUDA with bf16 and on CPUs with native bf16, else fp32). bf16 where it is not native "
        "runs fp32, with a note.",
    )


def strict_precision_option() -> Any:
    return typer.Option(
        False, "--strict-precision", rich_help_panel=RUNTIME_PANEL,
        help="Refuse (exit 2) instead of running fp32 when --dtype bf16 is not native here.",
    )


def threads_option() -> Any:
    return typer.Option(
        None, "--threads", show_default=False, rich_help_panel=RUNTIME_PANEL,
        help="CPU threads for torch (default: one per core).",
    )


def ignore_memory_check_option() -> Any:
    """`--ignore-memory-check`, declared here once for `sample` and `eval` (gptcli.limits.OVERRIDE)."""
    return typer.Option(
        False, "--ignore-memory-check", rich_help_panel=RUNTIME_PANEL,
        help="Run even when the memory estimate (weights, key/value cache or activations, logits) exceeds "
        "the memory this machine has available.",
    )


Plan = Callable[["GPTConfig"], tuple[int, int, int]]
"""From the model's config (read from the file's header): the rows a command runs at once, their
length in tokens (what the key/value cache or a window holds) and any further bytes they hold (e.g.
the new tokens kept until a row finishes, full-sequence logits), for the memory estimate made
before the weights are loaded."""


def check_inference_memory(runtime: RuntimeOptions, config: GPTConfig, precision: str, plan: Plan | None,
                           what: str) -> None:
    """Refuse (exit 2) a run whose estimate (gptcli.limits.decoding_bytes) exceeds the memory available:
    weights at their precision (int8 and int4 quantize after an fp32 load), plus `plan`'s rows x length."""
    from gptcli.limits import check_memory, decoding_bytes

    rows, length, extra = plan(config) if plan is not None else (1, config.context_length, 0)
    bytes_per_weight = 2 if precision == "bf16" else 4
    needed = decoding_bytes(config, rows, length, bytes_per_weight) + extra
    shape = f"{rows:,} {'row' if rows == 1 else 'rows'} of {length:,} tokens at once"
    check_memory(needed, f"{what} ({shape})", runtime.ignore_memory_check)


def stdin_is_piped() -> bool:
    return sys.stdin is not None and not sys.stdin.isatty()


def read_stdin() -> str:
    """All of stdin as UTF-8 text; invalid bytes are the same one-line error as `prepare -` gives."""
    from gptcli.textinput import read_stdin_text

    return read_stdin_text()


def load_for_inference(runtime: RuntimeOptions, one_row: bool = False, plan: Plan | None = None,
                       what: str = "this run") -> LoadedModel:
    """`runtime.model` on the chosen device and precision, with a loading line on stderr. `one_row`:
    see `runtime.resolve_precision`. The model's config is read from the file's header first, and the
    memory the run needs (`plan`, see `check_inference_memory`) checked before any weight is loaded."""
    from gptcli.modelfile import load_config, load_model, resolve_model_path
    from gptcli.runtime import resolve_device, resolve_dtype, resolve_precision
    from gptcli.ui import console

    device = resolve_device(runtime.device)
    precision, note = resolve_precision(runtime.dtype, device, runtime.strict_precision, one_row=one_row)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    path = resolve_model_path(runtime.model)
    check_inference_memory(runtime, load_config(path), precision, plan, what)
    start = time.perf_counter()
    model, path = load_model(path, device=device, dtype=resolve_dtype(precision))
    params = sum(p.numel() for p in model.parameters())
    if precision in ("int8", "int4"):
        from gptcli.quantize import quantize_model

        quantize_model(model, bits=precision)
    console.print(
        f"model {path}: {params / 1e6:.1f}M parameters, context {model.config.context_length}, "
        f"{device} {precision}, loaded in {time.perf_counter() - start:.1f} s",
        markup=False, highlight=False, soft_wrap=True,
    )
    return LoadedModel(model, str(path), device, precision)


def run_conversion(
    source: Path,
    out: Path | None,
    from_format: str,
    to_format: str,
    verify: bool,
    force: bool = False,
    n_heads: int | None = None,
    gguf_type: str = "f32",
) -> ConvertResult:
    """`convert` with a progress bar and a summary line on stderr (`convert`, `fetch gpt2 --convert`)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gptcli.convert import convert
    from gptcli.errors import EXIT_INTERRUPTED, GptcliError
    from gptcli.ui import byte_size, console

    start = time.perf_counter()
    progress = Progress(
        TextColumn("converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # a bar only where someone watches; nothing in logs
    )
    task = progress.add_task("", total=None)

    def on_tensor(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, description=name)

    try:
        with progress:
            result = convert(source, out, from_format, to_format, verify, on_tensor, force, n_heads, gguf_type)
    except KeyboardInterrupt:
        raise GptcliError("interrupted; no output was written", EXIT_INTERRUPTED) from None
    c = result.config
    console.print(
        f"[green]✓[/] {result.source_format} → {result.target_format}: {result.output} "
        f"({result.num_tensors} tensors, {byte_size(result.num_bytes)}; {c.n_layers} layers, "
        f"{c.emb_dim} dims, {c.n_heads} heads, context {c.context_length}, vocab {c.vocab_size}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    for note in result.notes:
        console.print(f"note: {note}")
    return result
