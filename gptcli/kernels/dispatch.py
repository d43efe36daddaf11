"""The one way into the fast paths: `@fast_path(name)` on a model method, the table of the kernel
behind each name, and the switch that turns them all off.

Kernels are found through `KERNELS` and imported on first use, so the model imports only this
module and no kernel module is loaded (or needs to know the model) until a fast path runs."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from gptcli.choices import DROPOUT_RNGS, DropoutRng

ENV_SWITCH = "GPTCLI_KERNELS"
"""Set to 0 to run the plain torch modules everywhere (what the equivalence tests compare against)."""

_RNG_ATTRIBUTE = "dropout_rng"
"""The plain attribute `set_dropout_rng` sets on every module of a model (any module class may carry it)."""

Kernel = Callable[..., "torch.Tensor | None"]
KERNELS: dict[str, str] = {
    "dropout": "gptcli.kernels.dropout:dropout",
    "attention": "gptcli.kernels.attention:attention",
    "feed_forward": "gptcli.kernels.feed_forward:feed_forward",
    "lm_head_loss": "gptcli.kernels.loss:model_loss",
    "linear": "gptcli.kernels.decoding:decoding_linear",
}
"""`@fast_path` name -> "module:function" of its kernel: `kernel(module, *args)` returns the method's
result, or None where it does not apply (the plain method then runs)."""

F = TypeVar("F", bound=Callable[..., Any])


def enabled() -> bool:
    """Whether the fast paths may run: not under GPTCLI_KERNELS=0 and not while torch.compile traces
    (it fuses the plain ops itself)."""
    return not torch.compiler.is_compiling() and os.environ.get(ENV_SWITCH, "1") != "0"


@functools.cache
def kernel(name: str) -> Kernel:
    """The kernel behind `name`, imported on first use."""
    module, function = KERNELS[name].split(":")
    return getattr(importlib.import_module(module), function)


def fast_path(name: str) -> Callable[[F], F]:
    """Mark a module method whose result a kernel may compute faster (same function, less memory
    or time); the method's own body is the plain, chapter-like computation."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def dispatch(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if enabled():
                out = kernel(name)(module, *args, **kwargs)
                if out is not None:
                    return out
            return method(module, *args, **kwargs)

        return dispatch  # type: ignore[return-value]

    return wrap


def set_dropout_rng(model: torch.nn.Module, rng: DropoutRng) -> None:
    """Choose the random numbers of `model`'s dropout kernels.

    "exact" (the default of every model): torch's own masks, drawn as `nn.Dropout` draws them, so
    a seeded run gives the chapter's numbers. "fast": four mask elements per 64-bit draw, about
    twice as fast to draw, but a different random stream (the same rate up to 8e-6)."""
    if rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout rng must be one of {', '.join(DROPOUT_RNGS)}, got {rng!r}")
    for module in model.modules():
        setattr(module, _RNG_ATTRIBUTE, rng)


def dropout_rng(module: torch.nn.Module) -> DropoutRng:
    """The dropout random numbers chosen for `module` (by `set_dropout_rng`), "exact" by default."""
    return getattr(module, _RNG_ATTRIBUTE, "exact")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on `device_type`, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None
