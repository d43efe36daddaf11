"""Dropout that keeps a 1-byte mask for the backward pass (torch's CPU dropout keeps a float32 one).

Private torch APIs: none. Falls back to the plain `F.dropout` off CPU, without autograd, and
under GPTCLI_KERNELS=0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gptcli.kernels.dispatch import DropoutRng, dropout_rng


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device, rng: DropoutRng = "exact"
              ) -> torch.Tensor:
    """Boolean mask of the dropped elements, each True with probability p.

    "exact": torch's dropout mask from the same generator state, leaving the generator where
    torch's dropout leaves it. CPU dropout is `bernoulli_(1 - p)` on the input's dtype, and that
    kernel draws the same numbers for any dtype: a serial 64-bit draw per element compared with
    1 - p at 53 bits (`torch.randint(0, 2**53, shape) < (1 - p) * 2**53`, e.g. on AMD), or MKL's
    stream seeded by one draw (Intel CPUs), so a bool tensor gets the same mask in 1 byte.

    "fast" (CPU): one 64-bit draw makes four 16-bit uniform integers, compared against p rounded
    to a multiple of 1/65536 (off by at most 8e-6): about 2x faster to draw than "exact" where
    the exact path is serial, but other random numbers than torch's. Rates below 1/256, where
    that rounding would matter, and element counts not divisible by 4 use `uniform_`."""
    if rng == "fast":
        count = math.prod(shape)
        threshold = round(p * 65536)
        if device.type == "cpu" and threshold >= 256 and count % 4 == 0:
            bits = torch.empty(count // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
            return (bits.view(torch.int16) < threshold - 32768).view(shape)
        return torch.empty(shape, device=device).uniform_() < p
    return ~torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


class _Dropout(torch.autograd.Function):
    """Inverted dropout: x * keep / (1 - p), the same value torch's dropout computes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, rng: DropoutRng) -> torch.Tensor:
        dropped = drop_mask(x.shape, p, x.device, rng)
        ctx.save_for_backward(dropped)
        ctx.scale = 1.0 / (1.0 - p)
        return x.masked_fill(dropped, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (dropped,) = ctx.saved_tensors
        return grad.masked_fill(dropped, 0.0).mul_(ctx.scale), None, None


def dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor | None:
    """Training on CPU with autograd: `_Dropout`; otherwise None (the plain module)."""
    if not module.training or module.p == 0.0:
        return x
    if x.device.type != "cpu" or not (torch.is_grad_enabled() and x.requires_grad) or module.p >= 1.0:
        return None
    return _Dropout.apply(x, module.p, dropout_rng(module))
