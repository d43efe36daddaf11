"""The chapter's optimizer, AdamW, with torch's fused kernel where there is one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch


def adamw(
    params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3, weight_decay: float = 1e-2, **kwargs: Any
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with torch's fused kernel when every parameter is on a device that has
    one (CPU since torch 2.4, CUDA, MPS...): one pass over each parameter instead of a dozen, about
    10x faster than the default per-tensor loop on CPU, and the same update up to float rounding.
    Falls back to torch's default implementation otherwise. (The fused update bumps no tensor
    versions: a copy derived from a parameter must not be kept across steps.)

    Private torch API: `torch.optim.optimizer._get_fused_kernels_supported_devices` (without it,
    fused on CUDA only)."""
    groups: list[torch.Tensor | dict] = list(params)  # read once: `params` may be a generator
    tensors = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        supported = {"cuda"}
    if "cpu" in supported and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 4):
        supported.discard("cpu")  # pragma: no cover
    fused = bool(tensors) and all(t.device.type in supported and t.is_floating_point() for t in tensors)
    if fused and "foreach" not in kwargs and "fused" not in kwargs:
        kwargs["fused"] = True
    # `groups` holds one kind only, as `params` did: the element union above lost that, torch's type needs it.
    same_kind = cast("list[torch.Tensor] | list[dict]", groups)
    return torch.optim.AdamW(same_kind, lr=lr, weight_decay=weight_decay, **kwargs)
