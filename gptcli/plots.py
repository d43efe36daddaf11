"""The chapter's two figures of a run, from its metrics.jsonl: `loss.png` (loss over epochs, tokens
seen on a twin axis) and `perplexity.png`. matplotlib is imported only when they are drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptcli.durable import atomic_write


def write_plots(run_dir: Path, metrics: list[dict[str, Any]], steps_per_epoch: int) -> list[Path]:
    """The chapter's two figures: loss over epochs (tokens-seen on a twin axis), and perplexity."""
    if not metrics:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [(m["step"] + 1) / steps_per_epoch for m in metrics]
    tokens = [m["tokens_seen"] for m in metrics]
    train = [m["train_loss"] for m in metrics]
    val = [m["val_loss"] for m in metrics]

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs, train, label="Training loss")
    ax1.plot(epochs, val, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(tokens, train, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    loss_png = run_dir / "loss.png"
    atomic_write(loss_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(tokens, [m["train_ppl"] for m in metrics], label="Training perplexity")
    ax.plot(tokens, [m["val_ppl"] for m in metrics], linestyle="-.", label="Validation perplexity")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Perplexity")
    ax.set_yscale("log")
    ax.set_title("Perplexity over training")
    ax.legend(loc="upper right")
    fig.tight_layout()
    ppl_png = run_dir / "perplexity.png"
    atomic_write(ppl_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return [loss_png, ppl_png]
