"""Cross-entropy loss and perplexity: the chapter's batch losses (used by training), and `gptcli
eval`'s scoring of texts with sliding windows and of a run's own train/val split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import tiktoken
    import torch

    from gptcli.model import GPT
    from gptcli.settings import TrainSettings


def batch_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one batch (the chapter's calc_loss_batch), computed by the model in
    chunks so the (batch, seq, vocab) logits never exist at once."""
    return model(inputs, targets=targets)


def mean_batch_loss(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    device: torch.device | str = "cpu",
) -> float:
    """Mean of the first `num_batches` batch losses (the chapter's calc_loss_loader); NaN if none.
    Small batches run on prepacked weights, packed for this call only (training calls this between
    optimizer steps)."""
    import torch

    from gptcli.kernels.decoding import PackedWeights

    total, count = 0.0, 0
    with torch.no_grad(), PackedWeights():
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


# --- evaluating text and runs (`gptcli eval`) -----------------------------------------------------

IGNORE_INDEX = -100  # cross_entropy's default: targets with this value are not scored


@dataclass
class EvalResult:
    """Loss of one source: the mean cross-entropy over its scored tokens."""

    source: str
    tokens: int  # tokens in the source (after --max-tokens)
    loss: float

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def to_dict(self) -> dict[str, Any]:
        """The result as plain values (a diverged loss stays NaN: gptcli.jsonio writes it as null)."""
        return {"source": self.source, "tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity}


def token_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows that score each of tokens[1:] exactly once, as (begin, end, first).

    Window inputs are tokens[begin:end] (at most `context_length`), its targets tokens[begin+1:end+1];
    only targets from local position `first` on are scored, the ones before were scored by an earlier
    window. Windows start every `stride` tokens, so with a stride below the context length each token
    is predicted with at least `context_length - stride` earlier tokens as context (the sliding-window
    perplexity of Hugging Face's guide); with stride = context length the windows do not overlap.
    """
    if not 1 <= stride <= context_length:
        raise UsageError(
            f"--stride must be between 1 and the context length ({context_length}), got {stride}"
        )
    windows = []
    begin = scored_until = 0  # targets up to index `scored_until` are scored
    last = num_tokens - 1
    while scored_until < last:
        end = min(begin + context_length, last)
        windows.append((begin, end, scored_until - begin))
        scored_until = end
        begin += stride
    return windows


def sliding_window_loss(
    model: GPT,
    tokens: Sequence[int] | np.ndarray,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """Mean cross-entropy of predicting tokens[1:] and the number of predictions (see `token_windows`)."""
    (loss, count), = window_losses(model, [tokens], stride, batch_size, device, on_batch)
    return loss, count


def window_losses(
    model: GPT,
    sources: Sequence[Sequence[int] | np.ndarray],
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> list[tuple[float, int]]:
    """(mean cross-entropy, predictions) of each source's tokens[1:] (see `token_losses`)."""
    import numpy as np

    losses = token_losses(model, sources, stride, batch_size, device, on_batch)
    return [(float(np.sum(each, dtype=np.float64) / len(each)), len(each)) for each in losses]


def token_losses(
    model: GPT,
    sources: Sequence[Sequence[int] | np.ndarray],
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """The cross-entropy of each prediction of each source: element i is -log p(tokens[i + 1]) given
    the tokens before it (the chapter's section 5.1.2 target probabilities), scored with `token_windows`.

    The windows of all sources are batched together, `batch_size` at a time, so short files share
    forward passes; a shorter window is right-padded, which causal attention never lets earlier
    positions see. `on_batch(done, total)` reports progress.
    """
    import numpy as np
    import torch

    from gptcli.kernels.decoding import PackedWeights

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    context_length = model.config.context_length
    windows = []  # (source, begin, end, first)
    for index, tokens in enumerate(sources):
        found = token_windows(len(tokens), context_length, stride or context_length)
        if not found:
            raise UsageError(f"need at least 2 tokens to compute a loss, got {len(tokens)}")
        windows += [(index, *window) for window in found]
    ids = [torch.from_numpy(np.asarray(tokens, dtype=np.int64)) for tokens in sources]
    out = [np.empty(len(tokens) - 1, dtype=np.float32) for tokens in sources]
    num_batches = -(-len(windows) // batch_size)
    with torch.inference_mode(), PackedWeights():  # a few short windows run on prepacked weights
        for b in range(num_batches):
            group = windows[b * batch_size : (b + 1) * batch_size]
            inputs, targets = _window_batch(ids, group)
            losses = _token_losses(model, inputs.to(device), targets.to(device)).float().cpu().numpy()
            for row, (source, begin, end, first) in enumerate(group):
                out[source][begin + first : end] = losses[row, first : end - begin]
            if on_batch is not None:
                on_batch(b + 1, num_batches)
    return out


def _window_batch(
    ids: list[torch.Tensor], group: list[tuple[int, int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets (IGNORE_INDEX where not scored) of a group of windows."""
    import torch

    width = max(end - begin for _, begin, end, _ in group)
    inputs = torch.zeros(len(group), width, dtype=torch.long)
    targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
    for row, (source, begin, end, first) in enumerate(group):
        inputs[row, : end - begin] = ids[source][begin:end]
        targets[row, first : end - begin] = ids[source][begin + 1 + first : end + 1]
    return inputs, targets


def _token_losses(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target (rows, seq), 0 where not scored."""
    import torch.nn.functional as F

    logits = model(inputs)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)


def evaluate_tokens(
    model: GPT,
    source: str,
    tokens: Sequence[int] | np.ndarray,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    return evaluate_sources(model, [(source, tokens)], stride, batch_size, max_tokens, device, on_batch)[0]


def evaluate_sources(
    model: GPT,
    sources: Sequence[tuple[str, Sequence[int] | np.ndarray]],
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> list[EvalResult]:
    """The loss of each (name, tokens) source, their windows batched together (`window_losses`)."""
    named = _checked_sources(model, sources, max_tokens)
    losses = window_losses(model, [tokens for _, tokens in named], stride, batch_size, device, on_batch)
    return [EvalResult(name, len(tokens), loss) for (name, tokens), (loss, _) in zip(named, losses, strict=True)]


def evaluate_per_token(
    model: GPT,
    sources: Sequence[tuple[str, Sequence[int] | np.ndarray]],
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> list[tuple[EvalResult, np.ndarray, np.ndarray]]:
    """(result, token ids, loss of each of tokens[1:]) of each source: `evaluate_sources` with the
    per-token losses it averages (`eval --per-token`)."""
    import numpy as np

    named = _checked_sources(model, sources, max_tokens)
    losses = token_losses(model, [tokens for _, tokens in named], stride, batch_size, device, on_batch)
    return [
        (EvalResult(name, len(tokens), float(np.sum(each, dtype=np.float64) / len(each))), np.asarray(tokens), each)
        for (name, tokens), each in zip(named, losses, strict=True)
    ]


def _checked_sources(
    model: GPT, sources: Sequence[tuple[str, Sequence[int] | np.ndarray]], max_tokens: int | None
) -> list[tuple[str, Sequence[int] | np.ndarray]]:
    """The sources cut to `max_tokens`, each with at least 2 tokens, all within the model's vocabulary."""
    named = []
    for name, tokens in sources:
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        if len(tokens) < 2:
            raise UsageError(f"{name}: need at least 2 tokens to compute a loss, got {len(tokens)}")
        check_model_vocab(model, tokens, name)
        named.append((name, tokens))
    return named


def check_model_vocab(model: GPT, tokens: Sequence[int] | np.ndarray, source: str) -> None:
    import numpy as np

    from gptcli.data import check_token_ids

    check_token_ids(np.asarray(tokens), model.config.vocab_size, source, "the model's vocabulary")


def read_run_settings(run_dir: str | Path) -> TrainSettings:
    """A run's training settings (`run.json`, read as `train --resume` reads it), with one clear line
    when the directory or its settings are missing or damaged."""
    from gptcli.settings import TrainSettings

    if not Path(run_dir).is_dir():
        raise GptcliError(f"run directory not found: {run_dir}")
    return TrainSettings.from_file(run_dir)


def evaluate_run_splits(
    model: GPT,
    run_dir: str | Path,
    tokenizer: tiktoken.Encoding,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
) -> list[EvalResult]:
    """Loss on the run's own train and val splits, computed the way training evaluates: the same
    character split, windows (context length, the run's stride) and batch size, batches in order
    (no shuffling, last partial batch kept) and the mean of the batch losses, over all batches."""
    from gptcli.data import BatchLoader, WindowDataset, load_splits

    settings = read_run_settings(run_dir)
    corpus = Path(settings.corpus)
    if not corpus.exists():
        raise GptcliError(
            f"the run's corpus {corpus} was not found (run.json records it as given to `gptcli train`; "
            "run eval from the same directory)"
        )
    context_length = model.config.context_length
    stride = settings.stride or context_length
    splits = load_splits(corpus, tokenizer, settings.train_ratio)
    results = []
    for name, tokens in (("train", splits.train), ("val", splits.val)):
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        check_model_vocab(model, tokens, f"the run's {name} split")
        dataset = WindowDataset(tokens, context_length, stride)
        loader = BatchLoader(dataset, settings.batch_size, shuffle=False, drop_last=False)
        if len(loader) == 0:
            raise UsageError(
                f"the run's {name} split has {len(tokens)} tokens, too few for one window of {context_length}"
            )
        loss = mean_batch_loss(model, loader.batches(None), len(loader), device)
        results.append(EvalResult(f"{run_dir} ({name})", len(tokens), loss))
    return results
