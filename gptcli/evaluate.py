"""Cross-entropy loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT


def batch_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one batch (the chapter's calc_loss_batch)."""
    import torch.nn.functional as F

    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def mean_batch_loss(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean of the first `num_batches` batch losses (the chapter's calc_loss_loader); NaN if none."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            if count >= num_batches:
                break
            total += batch_loss(model, inputs.to(device), targets.to(device)).item()
            count += 1
    return total / count if count else float("nan")


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
