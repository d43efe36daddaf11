"""Causal attention with dropout on the attention weights, for CPU training.

SDPA's CPU kernels cannot drop out attention weights, and its fallback keeps five float (batch,
heads, seq, seq) tensors for the backward pass; this keeps q, k, v and a 1-byte mask and
recomputes the weights. The masks are `drop_mask`'s, so by default torch's own, in the order
the chapter's `nn.Dropout` on the weights draws them.

Private torch APIs: `torch.ops.aten._softmax_backward_data` (the softmax's backward),
`torch.amp.custom_fwd/custom_bwd` (torch >= 2.4: the backward runs under the forward's autocast
state). Without the latter, under autocast, and in every case it does not cover (no dropout, a
key/value cache, an attention mask, no autograd, off CPU) it falls back to
`F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gptcli.kernels.dispatch import DropoutRng, autocast_dtype, dropout_rng
from gptcli.kernels.dropout import drop_mask

if TYPE_CHECKING:
    from gptcli.model import CausalSelfAttention

try:
    _custom_fwd = torch.amp.custom_fwd(device_type="cpu")
    _custom_bwd = torch.amp.custom_bwd(device_type="cpu")
    _UNDER_AUTOCAST = True
except (AttributeError, TypeError):  # pragma: no cover - older torch: SDPA under autocast
    _custom_fwd = _custom_bwd = lambda fn: fn  # noqa: E731
    _UNDER_AUTOCAST = False

_causal_masks: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _causal_bias(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(length, length) additive mask: 0 where a query may look, -inf above the diagonal."""
    key = (length, dtype, device)
    bias = _causal_masks.get(key)
    if bias is None:
        bias = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
        if len(_causal_masks) > 16:
            _causal_masks.clear()
        _causal_masks[key] = bias
    return bias


def _attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) for (batch, heads, seq, head_dim) q and k; the scale and
    the mask ride along in one baddbmm."""
    batch, heads, length, dim = q.shape
    q3 = q.reshape(batch * heads, length, dim)
    k3 = k.reshape(batch * heads, length, dim)
    bias = _causal_bias(length, q.dtype, q.device).expand(batch * heads, length, length)
    scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1).view(batch, heads, length, length)


class _CausalAttentionWithDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal mask), dropped out, times v. The backward recomputes the
    weights (the same ops on the same inputs, so the same values) and applies the chain rule by
    hand. Dropout's 1 / (1 - p) scales the (batch, heads, seq, head_dim) side of each product, 4x
    smaller than the (seq, seq) side at GPT-2's shapes."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                rng: DropoutRng) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        weights = _attention_weights(q, k, scale)
        dropped = drop_mask(weights.shape, p, weights.device, rng)
        out = torch.matmul(weights.masked_fill_(dropped, 0.0), v).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, dropped)
        ctx.scale, ctx.drop_scale = scale, 1.0 / (1.0 - p)
        return out

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, dropped = ctx.saved_tensors
        weights = _attention_weights(q, k, ctx.scale)
        grad_out = grad_out * ctx.drop_scale
        grad_weights = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(dropped, 0.0)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        del grad_weights
        # The softmax backward is done with the weights, so they can be dropped out in place.
        grad_v = torch.matmul(weights.masked_fill_(dropped, 0.0).transpose(-2, -1), grad_out)
        del weights
        grad_scores.mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, None, None


def causal_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                                  rng: DropoutRng = "exact") -> torch.Tensor:
    """Causal attention of (batch, heads, seq, head_dim) queries, keys and values with dropout `p`
    on the attention weights: SDPA with `is_causal=True, dropout_p=p`, keeping less for the
    backward pass (when autograd records it; SDPA itself otherwise)."""
    autocast = autocast_dtype(q.device.type) is not None
    if (
        torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and (_UNDER_AUTOCAST or not autocast)
    ):
        return _CausalAttentionWithDropout.apply(q, k, v, p, rng)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


def attention(module: CausalSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    """Training with dropout on CPU, no cache: `causal_attention_with_dropout`; otherwise None."""
    p = module.dropout if module.training else 0.0
    if p == 0.0 or mask is not None or not is_causal or q.device.type != "cpu" or q.shape[2] != k.shape[2]:
        return None
    return causal_attention_with_dropout(q, k, v, p, dropout_rng(module))
