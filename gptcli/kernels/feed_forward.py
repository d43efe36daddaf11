"""The feed-forward block, proj(gelu_tanh(fc(x))), recomputing its GELU in the backward pass: the
(rows, 4 emb) GELU output is not kept (autograd would keep it for `proj`'s weight gradient).

Private torch APIs: `torch.ops.aten.gelu_backward`. Falls back to the plain modules off CPU,
outside float32 training with autograd, under autocast, and for a `fc` without bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gptcli.kernels.dispatch import autocast_dtype

if TYPE_CHECKING:
    from gptcli.model import FeedForward


class _FeedForward(torch.autograd.Function):
    """proj(gelu_tanh(fc(x))) on (rows, emb) inputs, keeping x and fc(x) for the backward pass."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        hidden = torch.addmm(b1, x, w1.t())
        out = torch.addmm(b2, F.gelu(hidden, approximate="tanh"), w2.t())
        ctx.save_for_backward(x, w1, w2, hidden)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w1, w2, hidden = ctx.saved_tensors
        activated = F.gelu(hidden, approximate="tanh")
        grad_w2 = torch.mm(grad.t(), activated)
        del activated
        grad_b2 = grad.sum(0)
        grad_hidden = torch.ops.aten.gelu_backward(torch.mm(grad, w2), hidden, approximate="tanh")
        grad_w1 = torch.mm(grad_hidden.t(), x)
        grad_b1 = grad_hidden.sum(0)
        grad_x = torch.mm(grad_hidden, w1)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def feed_forward(module: FeedForward, x: torch.Tensor) -> torch.Tensor | None:
    fc, proj = module.fc, module.proj
    if (
        not module.training
        or not torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or fc.bias is None
        or proj.bias is None
        or autocast_dtype("cpu") is not None
    ):
        return None
    out = _FeedForward.apply(x.reshape(-1, x.shape[-1]), fc.weight, fc.bias, proj.weight, proj.bias)
    return out.view(*x.shape[:-1], out.shape[-1])
