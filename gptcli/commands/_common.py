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


def load_for_inference(model_spec: str | None, device_name: str, dtype_name: str) -> tuple[GPT, str, str]:
    """The model on the chosen device and dtype, with a loading line on stderr; (model, path, device)."""
    from gptcli.checkpoint import load_model
    from gptcli.runtime import resolve_device, resolve_dtype
    from gptcli.ui import console

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name)
    start = time.perf_counter()
    model, path = load_model(model_spec, device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"model {path}: {params / 1e6:.1f}M parameters, context {model.config.context_length}, "
        f"{device} {dtype_name}, loaded in {time.perf_counter() - start:.1f} s",
        markup=False, highlight=False, soft_wrap=True,
    )
    return model, str(path), device
