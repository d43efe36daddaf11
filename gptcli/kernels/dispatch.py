"""The one way into the fast paths: `@fast_path(name)` on a model method, the kernels registered
under that name, and the switch that turns them all off."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

ENV_SWITCH = "GPTCLI_KERNELS"
"""Set to 0 to run the plain torch modules everywhere (what the equivalence tests compare against)."""

DropoutRng = Literal["exact", "fast"]
DROPOUT_RNGS: tuple[DropoutRng, ...] = ("exact", "fast")
_RNG_ATTRIBUTE = "dropout_rng"
"""The plain attribute `set_dropout_rng` sets on every module of a model (any module class may carry it)."""

Kernel = Callable[..., "torch.Tensor | None"]
_kernels: dict[str, Kernel] = {}

F = TypeVar("F", bound=Callable[..., Any])


def enabled() -> bool:
    """Whether the fast paths may run: not under GPTCLI_KERNELS=0 and not while torch.compile traces
    (it fuses the plain ops itself)."""
    return not torch.compiler.is_compiling() and os.environ.get(ENV_SWITCH, "1") != "0"


def register(name: str) -> Callable[[Kernel], Kernel]:
    """Make `kernel(module, *args)` the fast path of the methods marked `@fast_path(name)`. It
    returns the method's result, or None where it does not apply (the plain method then runs)."""

    def add(kernel: Kernel) -> Kernel:
        _kernels[name] = kernel
        return kernel

    return add


def fast_path(name: str) -> Callable[[F], F]:
    """Mark a module method whose result a kernel may compute faster (same function, less memory
    or time); the method's own body is the plain, chapter-like computation."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def dispatch(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            kernel = _kernels.get(name)
            if kernel is not None and enabled():
                out = kernel(module, *args, **kwargs)
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
