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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
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
    if _packed_op_works.get(device) is False or torch.compiler.is_compiling():
        return None
    try:
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales)
    except (AttributeError, RuntimeError, NotImplementedError):
        _packed_op_works[device] = False
        return None
    _packed_op_works[device] = True
    return out


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every `nn.Linear` of `model` (blocks and output head) by an `Int8Linear`, in place.

    A head tied to the token embedding gets its own int8 copy; the embedding stays as it is."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child, compute_dtype).to(child.weight.device))
        else:
            quantize_model(child, compute_dtype)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
