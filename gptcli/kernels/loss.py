"""The output layer and the cross-entropy together, a chunk of rows at a time, so the (batch, seq,
vocab) logits and their gradient never exist whole.

Private torch APIs: none. Falls back to the plain `F.cross_entropy(out_head(hidden))` while
torch.compile traces and under GPTCLI_KERNELS=0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gptcli.kernels.dispatch import autocast_dtype

if TYPE_CHECKING:
    from gptcli.model import GPT

LOSS_CHUNK_ELEMENTS = 1 << 24
"""Most logits `lm_head_loss` computes at once (64 MiB in float32); the rows are split into equal
chunks of at most this // vocab rows."""


class _LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, a chunk of rows at a time.

    When gradients are wanted they are computed in the forward pass, chunk by chunk (softmax minus
    one-hot, times the weight and the hidden states); the backward pass only scales them by the
    incoming gradient.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
        want_grad: bool, ignore_index: int,
    ) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunks = -(-rows // max(1, LOSS_CHUNK_ELEMENTS // vocab))
        step = -(-rows // chunks)  # equal chunks: 512 rows make two of 256, not 333 + 179
        h, w = hidden.to(dtype), weight.to(dtype)
        scored = targets != ignore_index
        count = scored.sum()
        safe_targets = targets.masked_fill(~scored, 0)[:, None]
        want_h = want_grad and ctx.needs_input_grad[0]
        want_w = want_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w: torch.Tensor | None = None
        inv_count = 1.0 / count.clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            h_chunk, chunk_scored = h[start:end], scored[start:end]
            chunk_targets = safe_targets[start:end].view(1, -1)
            # Transposed logits (vocab, rows): MKL runs W @ h^T ~30% faster than h @ W^T here.
            logits = torch.mm(w, h_chunk.t()).float()
            picked = logits.gather(0, chunk_targets)
            if not (want_h or want_w):
                lse = torch.logsumexp(logits, dim=0, keepdim=True)
                total += ((lse - picked).squeeze(0) * chunk_scored).sum()
                continue
            # One pass of exp, in place, serves the loss and its gradient: exp(logits - max) is
            # the unnormalised softmax, and its column sums give logsumexp = max + log(sum).
            peak = logits.amax(dim=0, keepdim=True)
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=0, keepdim=True)
            total += ((peak + sums.log() - picked).squeeze(0) * chunk_scored).sum()
            # d(loss)/d(logits) = (softmax - one_hot) / count, zero for unscored rows.
            weight_per_row = (chunk_scored * inv_count).view(1, -1)
            probs.mul_(weight_per_row / sums)
            probs.scatter_add_(0, chunk_targets, -weight_per_row)
            g = probs.to(dtype)
            if grad_h is not None:
                torch.mm(g.t(), w, out=grad_h[start:end])
            if want_w:
                grad_w = _accumulate(grad_w, g, h_chunk, dtype)
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count.to(torch.float32)  # NaN when nothing is scored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        one = grad_loss.device.type == "cpu" and float(grad_loss) == 1.0
        if grad_h is not None:
            grad_h = (grad_h if one else grad_h * grad_loss).to(ctx.dtypes[0])
        if grad_w is not None:
            if not one:
                grad_w.mul_(grad_loss)
            grad_w = grad_w.to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None


def _accumulate(total: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """total + g @ h, kept in float32."""
    if total is None:
        total = torch.mm(g, h)
        return total if total.dtype == torch.float32 else total.float()
    if dtype == torch.float32:
        return total.addmm_(g, h)
    return total.add_(torch.mm(g, h))


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                 ) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)` for
    (rows, emb) hidden states, a (vocab, emb) output weight and (rows,) targets, computed
    `LOSS_CHUNK_ELEMENTS` logits at a time. Under autocast the output layer runs in the autocast
    dtype, like `nn.Linear` would, and the loss in float32."""
    device_type = hidden.device.type
    dtype = autocast_dtype(device_type) or torch.promote_types(hidden.dtype, weight.dtype)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LMHeadLoss.apply(hidden, weight, targets, dtype, want_grad, ignore_index)


def model_loss(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """`GPT.loss` for (batch, seq, emb) final hidden states and (batch, seq) targets; None for an
    output layer whose weight is not a float matrix (gptcli.quantize's int8 layers)."""
    if not model.out_head.weight.is_floating_point():
        return None
    return lm_head_loss(hidden.flatten(0, 1), model.out_head.weight, targets.flatten())
