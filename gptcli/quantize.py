"""`--dtype int8`: weight-only int8 with one scale per output channel, for every linear layer and
the output head (the embeddings stay as loaded), quantized at load.

w ~ scale[o] * q[o, i], q in [-127, 127] and scale[o] = max_i |w[o, i]| / 127: the rounding error
of each weight is at most half a step of its own row's range. Activations stay in floating point.

Kernels, measured on an AVX-512 CPU with torch 2.13 (benchmarks/run.py, case `int8`):

- a few rows (decoding steps): `torch.ops.aten._weight_int8pack_mm`, which reads the int8 weight
  once and takes bf16 activations; 2-10x faster per matrix-vector product than fp32 here. (With
  float32 activations the same op was 4-10x *slower* than fp32, so inputs are cast to bf16.)
- many rows (prefill, `eval`): the weight is dequantized to the compute dtype and multiplied with
  an ordinary matmul, whose cost the rows amortise;
- where `_weight_int8pack_mm` is missing for a device or raises, the dequantizing path too, so
  every device runs (correct, if not faster).

`--dtype int4`: weight-only 4-bit, each run of `INT4_GROUP` inputs of an output row with its own
scale and offset (asymmetric, like llama.cpp's q4_1): w ~ (q - 8) * scale + offset, q in 0..15.
On CPU it runs torch's `_weight_int4pack_mm_for_cpu` for every row count (it reads a quarter of
fp32's bytes: 2.4x int8's matrix-vector speed, and about fp32's speed for many rows); elsewhere
the weight is dequantized. Both paths compute the same function (the kernel's bf16 scale and offset).

Private torch APIs: `_weight_int8pack_mm`, `_convert_weight_to_int4pack_for_cpu` and
`_weight_int4pack_mm_for_cpu`; GPTCLI_KERNELS=0 runs the dequantizing paths instead.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.kernels.dispatch import enabled as kernels_enabled

PACKED_ROWS = 32
"""Inputs of at most this many rows go through `_weight_int8pack_mm`; more are dequantized."""

_packed_op_works: dict[str, bool] = {}


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel scales (weight-only quantization).

    `weight` is the int8 matrix (out, in), `scales` (out,) its float32 scales; `compute_dtype` is
    what the dequantizing path multiplies in."""

    # Buffers (registered in __init__), declared for the type checker.
    weight: torch.Tensor
    scales: torch.Tensor
    scales_bf16: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        # max |w| per row and the rounding in place: the same values as abs().amax() and round(), in a
        # quarter less time at load (part of `sample --dtype int8`'s time to its first token)
        scales = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)
        quantized = torch.div(weight, scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.compute_dtype = compute_dtype

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= PACKED_ROWS and not torch.is_grad_enabled():
            out = _packed_mm(x.reshape(rows, -1), self.weight, self.scales_bf16)
            if out is not None:
                out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
                return out + self.bias.to(x.dtype) if self.bias is not None else out
        dtype = self.compute_dtype
        out = F.linear(x.to(dtype), self.dequantized(dtype), None if self.bias is None else self.bias.to(dtype))
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _packed_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`x @ (scales * weight).T` with torch's weight-only int8 kernel, or None where it fails."""
    device = x.device.type
    if _packed_op_works.get(device) is False or not kernels_enabled():
        return None
    try:
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales)
    except (AttributeError, RuntimeError, NotImplementedError):
        _packed_op_works[device] = False
        return None
    _packed_op_works[device] = True
    return out


INT4_GROUP = 32
"""Inputs per int4 scale and offset (llama.cpp's q4 block). A layer whose input size it does not
divide uses one group per row."""

_INT4_ROWS = 16
"""torch's int4 kernel packs output rows by 16: other counts (the vocabulary) are padded with zero rows."""


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights, a scale and an offset per `group` inputs of each output row
    (weight-only). `packed` layers hold torch's CPU kernel layout; the others hold two 4-bit values
    per byte, (out, in / 2), and multiply the dequantized weight in `compute_dtype`."""

    weight: torch.Tensor
    scales_and_offsets: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.group = INT4_GROUP if self.in_features % INT4_GROUP == 0 else self.in_features
        levels, scales_and_offsets = _int4_levels(weight, self.group)
        packed = _int4_pack(levels, scales_and_offsets, self.group) if weight.device.type == "cpu" else None
        self.packed = packed is not None
        if packed is not None:
            packed_weight, scales_and_offsets = packed
        else:
            packed_weight = levels[:, 0::2] | (levels[:, 1::2] << 4)
        self.register_buffer("weight", packed_weight)
        self.register_buffer("scales_and_offsets", scales_and_offsets)  # (in / group, out, 2), bf16
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None)
        self.compute_dtype = compute_dtype

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) that both paths multiply by."""
        if self.packed:  # the kernel applied to the identity gives the weight's transpose
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight.device)
            return self._packed_product(eye).t().to(dtype)
        levels = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).view(self.out_features, -1, self.group)
        scales, offsets = self.scales_and_offsets.float().unbind(-1)  # (in / group, out) each
        weight = (levels.float() - 8) * scales.t()[:, :, None] + offsets.t()[:, :, None]
        return weight.view(self.out_features, self.in_features).to(dtype)

    def _packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.weight, self.group,
                                                          self.scales_and_offsets)
        return out[:, : self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.packed:  # inference only: the kernel has no gradient
            out = self._packed_product(rows).to(x.dtype)
        else:
            out = F.linear(rows.to(self.compute_dtype), self.dequantized(self.compute_dtype)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


def _int4_levels(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values (out, in) as uint8 and the bf16 scales and offsets (in / group, out, 2) that map
    them back: each group's range split into 15 steps, rounded against the bf16 values used."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
    offsets = (low + 8 * scales.float()).to(torch.bfloat16)
    # one temporary, rounded in place: the weights' size in float32 is 154 MB for GPT-2's output layer
    levels = torch.sub(groups, offsets.float()[..., None]).div_(scales.float()[..., None]).add_(8)
    levels.round_().clamp_(0, 15)
    scales_and_offsets = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous()
    return levels.to(torch.uint8).view(out_features, in_features), scales_and_offsets


def _int4_pack(levels: torch.Tensor, scales_and_offsets: torch.Tensor, group: int
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's CPU int4 layout of `levels` and the scales and offsets it takes (both padded to a
    multiple of 16 rows), or None where its kernel is missing, switched off or does not take this shape."""
    if not kernels_enabled():
        return None
    rows, padding = levels.shape[0], -levels.shape[0] % _INT4_ROWS
    try:
        padded = levels.new_zeros(rows + padding, levels.shape[1], dtype=torch.int32)
        padded[:rows] = levels
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 2)
        scales_and_offsets = F.pad(scales_and_offsets, (0, 0, 0, padding))
        probe = torch.zeros(1, levels.shape[1], dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(probe, packed, group, scales_and_offsets)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return packed, scales_and_offsets


ModelT = TypeVar("ModelT", bound=nn.Module)

QUANTIZED_LAYERS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear}
"""`--dtype` -> the layer that replaces each `nn.Linear`."""


def quantize_model(model: ModelT, compute_dtype: torch.dtype = torch.float32, bits: str = "int8") -> ModelT:
    """Replace every `nn.Linear` of `model` (blocks and output head) by an `Int8Linear` (or, with
    `bits="int4"`, an `Int4Linear`), in place.

    A head tied to the token embedding gets its own quantized copy; the embedding stays as it is."""
    layer = QUANTIZED_LAYERS[bits]
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, layer(child, compute_dtype).to(child.weight.device))
        else:
            quantize_model(child, compute_dtype, bits)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
