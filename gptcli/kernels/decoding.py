"""Linear layers for decoding steps on CPU (a few rows, no autograd).

A matrix-vector product streams the weight from memory once, and torch's kernels for one row
leave bandwidth unused: float32 runs on one core (here the rows of the weight are split over the
threads with one batched matmul), and bfloat16 is 20-25% faster with oneDNN's prepacked weights
(which cost one extra copy of the bfloat16 weights while decoding).

Private torch APIs: `torch.ops.mkldnn._is_mkldnn_bf16_supported`, `_reorder_linear_weight` and
`_linear_pointwise` (bfloat16 only). Without them bfloat16 falls back to `F.linear`; float32 uses
public ops only. Anything but a decoding step on CPU falls back to `F.linear`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.kernels.dispatch import register

DECODE_ROWS = 4
"""Inputs of at most this many rows (batch x positions) count as decoding steps."""

try:
    _BF16_KERNELS = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
except (AttributeError, RuntimeError):  # pragma: no cover - torch without oneDNN
    _BF16_KERNELS = False

_packed_weights: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's prepacked copy of a bfloat16 weight (built once, rebuilt when the weight changes),
    or None where torch lacks the op."""
    key = (weight.data_ptr(), weight._version)
    cached = _packed_weights.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == key:
        return cached[2]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    except (AttributeError, RuntimeError):
        return None
    ident = id(weight)
    _packed_weights[ident] = (weakref.ref(weight, lambda _: _packed_weights.pop(ident, None)), key, packed)
    return packed


def _split_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight's rows split over `parts` threads."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    size = out_features // parts
    main = size * parts
    chunks = weight[:main].view(parts, size, in_features).transpose(1, 2)
    out = torch.bmm(rows.expand(parts, *rows.shape), chunks)  # (parts, rows, size)
    out = out.transpose(0, 1).reshape(rows.shape[0], main)  # a view for one row
    if main < out_features:
        out = torch.cat([out, F.linear(rows, weight[main:])], dim=1)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)


@register("linear")
def decoding_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` for a decoding step on CPU; None for anything else."""
    weight, bias = layer.weight, layer.bias
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() > DECODE_ROWS * x.shape[-1]:
        return None
    if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16:
        packed = _packed(weight) if _BF16_KERNELS else None
        if packed is None:
            return None
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    parts = torch.get_num_threads()
    if (
        weight.dtype != torch.float32
        or x.dtype != torch.float32
        or parts < 2
        or weight.shape[0] < 64 * parts
        or not weight.is_contiguous()
    ):
        return None
    return _split_matvec(x, weight, bias, parts)
