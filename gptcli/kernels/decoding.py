"""Linear layers for decoding steps on CPU (a few rows, no autograd).

A matrix-vector product streams the weight from memory once, and torch's kernels for a few rows
leave bandwidth unused. Up to PACKED_ROWS rows (one row, or a batched decoding step:
gptcli.batched) go through oneDNN's prepacked weights: float32 2-4x faster than MKL's sgemm at
1-32 rows, bfloat16 20-25% faster (both cost one extra copy of the weights while decoding). Where
packing is unavailable, float32 steps of up to DECODE_ROWS rows split the weight's rows over the
threads with one batched matmul.

Prepacked copies belong to a decoding scope (`with PackedWeights():`), entered by what decodes or
scores without autograd (gptcli.batched, gptcli.beam, gptcli.evaluate, `sample`, `eval`): made on
first use inside it and dropped with it. Outside a scope nothing is packed. A copy cannot notice
every change of its weight (torch's fused optimizers update parameters without bumping their
version counter), so no copy may outlive the decode that made it: training's epoch sample packs the
weights as that epoch left them, and no optimizer needs to know about decoding.

Private torch APIs: `torch.ops.mkldnn._is_mkldnn_bf16_supported`, `_reorder_linear_weight` and
`_linear_pointwise`. Without them bfloat16 falls back to `F.linear` and float32 to the split
product (public ops only). Anything else (more rows, autograd, autocast, another device, other
weight dtypes such as gptcli.quantize's int8 layers) falls back to the layer's own forward.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.kernels.dispatch import autocast_dtype

DECODE_ROWS = 4
"""float32 inputs of at most this many rows may take the split matrix-vector product."""

PACKED_ROWS = 64
"""Inputs of at most this many rows (batched decoding steps) use oneDNN's prepacked weights."""

_PACK_BATCH_HINT = {torch.float32: 32, torch.bfloat16: 1}
"""oneDNN's batch-size hint for the layout of prepacked weights (measured best: float32 with 32,
2-4x faster than MKL's sgemm at 1-32 rows on an AVX-512 CPU; bfloat16 with 1)."""

try:
    _BF16_KERNELS = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
except (AttributeError, RuntimeError):  # pragma: no cover - torch without oneDNN
    _BF16_KERNELS = False


class PackedWeights:
    """A decoding scope: oneDNN's prepacked copies of the float32 and bfloat16 weights that decoding
    steps multiply by while the scope is active (`with scope:`), each made on first use.

    Entering a scope while another is active keeps the outer one in charge, so nested decodes (the
    prompts of one `sample` run) share one packing. A decoder may hold a scope across its steps and
    activate it around each step only, so that it is not active while a caller holds a token."""

    def __init__(self) -> None:
        # id(weight) -> (the weight, its (data_ptr, version) when packed, the packed copy)
        self._copies: dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = {}
        self._tokens: list[Token[PackedWeights | None]] = []

    def __enter__(self) -> PackedWeights:
        outer = _active.get()
        self._tokens.append(_active.set(outer if outer is not None else self))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        _active.reset(self._tokens.pop())

    def __len__(self) -> int:
        return len(self._copies)

    def packed(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The prepacked copy of `weight` (rebuilt when an in-place op changed it within the scope),
        or None where torch lacks the op."""
        key = (weight.data_ptr(), weight._version)
        cached = self._copies.get(id(weight))
        if cached is not None and cached[0] is weight and cached[1] == key:
            return cached[2]
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT[weight.dtype])
        except (AttributeError, RuntimeError, KeyError):
            return None
        self._copies[id(weight)] = (weight, key, packed)
        return packed


_active: ContextVar[PackedWeights | None] = ContextVar("gptcli_packed_weights", default=None)


def active_scope() -> PackedWeights | None:
    """The decoding scope in charge here, if any."""
    return _active.get()


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


def _packable(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked kernel takes this weight and input (same dtype, no autocast)."""
    native = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _BF16_KERNELS)
    return native and x.dtype == weight.dtype and autocast_dtype("cpu") is None


def decoding_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` for a decoding step on CPU; None for anything else."""
    weight, bias = layer.weight, layer.bias
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() > PACKED_ROWS * x.shape[-1]:
        return None
    scope = _active.get()
    if scope is not None and _packable(weight, x):
        packed = scope.packed(weight)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    parts = torch.get_num_threads()
    if (
        weight.dtype != torch.float32
        or x.dtype != torch.float32
        or x.numel() > DECODE_ROWS * x.shape[-1]
        or parts < 2
        or weight.shape[0] < 64 * parts
        or not weight.is_contiguous()
    ):
        return None
    return _split_matvec(x, weight, bias, parts)
