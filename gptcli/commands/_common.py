"""Helpers that `sample` and `eval` share (commands do not import each other): stdin, and loading a
model for inference. Heavy modules are imported inside the functions."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptcli.model import GPT


def stdin_is_piped() -> bool:
    return sys.stdin is not None and not sys.stdin.isatty()


def read_stdin() -> str:
    """All of stdin as UTF-8 text; invalid bytes are the same one-line error as `prepare -` gives."""
    from gptcli.data import read_stdin_text

    return read_stdin_text()


def load_for_inference(
    model_spec: str | None, device_name: str, dtype_name: str, strict_precision: bool = False, one_row: bool = False
) -> tuple[GPT, str, str, str]:
    """The model on the chosen device and precision, with a loading line on stderr; (model, path,
    device, the precision that runs: fp32, bf16 or int8). `one_row`: see `runtime.resolve_precision`."""
    from gptcli.checkpoint import load_model
    from gptcli.runtime import resolve_device, resolve_dtype, resolve_precision
    from gptcli.ui import console

    device = resolve_device(device_name)
    precision, note = resolve_precision(dtype_name, device, strict_precision, one_row=one_row)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    start = time.perf_counter()
    model, path = load_model(model_spec, device=device, dtype=resolve_dtype(precision))
    params = sum(p.numel() for p in model.parameters())
    if precision == "int8":
        from gptcli.quantize import quantize_model

        quantize_model(model)
    console.print(
        f"model {path}: {params / 1e6:.1f}M parameters, context {model.config.context_length}, "
        f"{device} {precision}, loaded in {time.perf_counter() - start:.1f} s",
        markup=False, highlight=False, soft_wrap=True,
    )
    return model, str(path), device, precision
