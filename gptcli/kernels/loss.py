"""The output layer and the cross-entropy together, a chunk of rows at a time, so the (batch, seq,
vocab) logits and their gradient never exist whole.

Private torch APIs: none. Falls back to the plain `F.cross_entropy(out_head(hidden))` while
torch.compile traces and under GPTCLI_KERNELS=0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from gptcli.kernels.dispatch import autocast_dtype

if TYPE_CHECKING:
    from gptcli.model import GPT

LOSS_CHUNK_ELEMENTS = 1 << 24
"""Most logits `lm_head_loss` computes at once (64 MiB in float32); the rows are split into equal
chunks of at most this // vocab rows."""

GRADIENT_SLAB_ELEMENTS = 1 << 27
"""Below float32, the logits' gradients of this many chunk elements (256 MiB in bf16) are gathered
for one weight-gradient product: a product per chunk, each cast and added at the weight's size, cost
18% of the output layer's time at batch 8 in bf16."""


class _WeightGradient:
    """The output weight's gradient, the sum over chunks of g @ h: in float32 one product per chunk
    added in place; below float32 one product per slab of chunks (`GRADIENT_SLAB_ELEMENTS`)."""

    def __init__(self, vocab: int, rows: int, step: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.total, self.used = dtype, cast("torch.Tensor | None", None), 0
        slab_rows = min(rows, max(1, GRADIENT_SLAB_ELEMENTS // (vocab * step)) * step)
        self.slab = None if dtype == torch.float32 else torch.empty(vocab, slab_rows, dtype=dtype, device=device)

    def chunk(self, probs: torch.Tensor) -> torch.Tensor:
        """A chunk's gradient (vocab, chunk rows) in the compute dtype, in the slab where there is one."""
        if self.slab is None:
            return probs.to(self.dtype)
        columns = probs.shape[1]
        self.used += columns
        return self.slab[:, self.used - columns : self.used].copy_(probs)

    def add(self, g: torch.Tensor, hidden: torch.Tensor, start: int, end: int) -> None:
        """Count chunk `g` (of rows start:end); a full or last slab is multiplied out."""
        if self.slab is None:
            h = hidden[start:end]
            self.total = torch.mm(g, h) if self.total is None else self.total.addmm_(g, h)
        elif self.used == self.slab.shape[1] or end == hidden.shape[0]:
            product = torch.mm(self.slab[:, : self.used], hidden[end - self.used : end])
            self.total = product if self.total is None else self.total.float().add_(product)
            self.used = 0


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
        grad_w = _WeightGradient(vocab, rows, step, dtype, hidden.device) if want_w else None
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
            g = probs.to(dtype) if grad_w is None else grad_w.chunk(probs)
            if grad_h is not None:
                torch.mm(g.t(), w, out=grad_h[start:end])
            if grad_w is not None:
                grad_w.add(g, h, start, end)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.total)
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
