"""Corpora, token arrays, sliding windows and batch loaders with the chapter's semantics.

Text is split by characters (90/10 by default), each part tokenized, and cut into windows of
`context_length` tokens every `stride` tokens; targets are the inputs shifted by one. The
training loader shuffles and drops the last partial batch; the validation loader does neither.
`BatchLoader` draws from torch's global RNG exactly as `torch.utils.data.DataLoader` does, so a
seeded run reproduces the chapter's, and its epoch order is resumable from a saved seed.

A directory made by `gptcli prepare` gives memory-mapped train/val arrays instead (its split is
fixed by prepare); windows are read straight from the map. `RandomWindowLoader` is the nanoGPT-style
alternative to epochs: every step draws windows at random token offsets.

`load_training_data` builds a training run's loaders from its settings, checking everything (enough
tokens and windows, the vocabulary, the batch's split over processes) before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptcli.errors import GptcliError, UsageError
from gptcli.textinput import read_text_file
from gptcli.tokenfile import read_meta

if TYPE_CHECKING:
    import tiktoken
    import torch

    from gptcli.distributed import Distributed
    from gptcli.settings import TrainSettings


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def tokenize(text: str, tokenizer: tiktoken.Encoding) -> np.ndarray:
    from gptcli.tokenizer import encode

    return np.asarray(encode(tokenizer, text), dtype=token_dtype(tokenizer.n_vocab))


@dataclass
class Splits:
    """Token arrays for training and validation, and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    vocab_size: int | None = None  # of the tokenizer that made the ids, when known


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str, vocabulary: str) -> None:
    """Every id in `tokens` fits a vocabulary of `vocab_size` (one pass over the array; an id past
    the embedding would otherwise be an IndexError, or garbage on some devices)."""
    if len(tokens) == 0:
        return
    largest = int(np.max(tokens))
    if largest >= vocab_size:
        raise UsageError(
            f"{source} holds token id {largest:,}, outside {vocabulary} of {vocab_size:,} ids (0 to {vocab_size - 1:,})"
        )


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    if not 0.0 < train_ratio < 1.0:
        raise UsageError(f"train-ratio must be between 0 and 1, got {train_ratio}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def text_splits(path: str | Path, tokenizer: tiktoken.Encoding, train_ratio: float = 0.9) -> Splits:
    train_text, val_text = split_text(read_text_file(path), train_ratio)
    return Splits(tokenize(train_text, tokenizer), tokenize(val_text, tokenizer), str(path))


def check_enough_tokens(splits: Splits, context_length: int) -> None:
    """The chapter's sanity checks, as errors (exit code 2)."""
    if len(splits.train) <= context_length:
        raise UsageError(
            f"not enough tokens for the training loader ({len(splits.train)} tokens, context length "
            f"{context_length}); lower --context-length or increase --train-ratio"
        )
    if len(splits.val) <= context_length:
        raise UsageError(
            f"not enough tokens for the validation loader ({len(splits.val)} tokens, context length "
            f"{context_length}); lower --context-length or decrease --train-ratio"
        )


class WindowDataset:
    """Input/target windows over a 1-D token array (in memory or memory-mapped).

    Window i starts at token i * stride; as in the chapter, starts run over
    range(0, len(tokens) - context_length, stride).
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int) -> None:
        if stride < 1:
            raise UsageError(f"stride must be at least 1, got {stride}")
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        self.num_windows = max(0, -(-(len(tokens) - context_length) // stride))

    def __len__(self) -> int:
        return self.num_windows

    def window(self, index: int) -> np.ndarray:
        start = index * self.stride
        return np.asarray(self.tokens[start : start + self.context_length + 1], dtype=np.int64)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        chunk = torch.from_numpy(np.stack([self.window(i) for i in indices]))
        return chunk[:, :-1], chunk[:, 1:]


class BatchLoader:
    """Batches of windows, drawing from torch's global RNG the way `DataLoader` does.

    Each pass (`iter`) first draws DataLoader's base seed, then, when shuffling, the
    RandomSampler's seed that fixes the pass's permutation. `epoch_order` exposes that seed so a
    checkpoint can store it and a resumed run can rebuild the same order.
    """

    def __init__(
        self,
        dataset: WindowDataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draw_order_seed(self) -> int | None:
        """Consume the global RNG like `iter(DataLoader)` and return the shuffle seed (or None)."""
        import torch

        torch.empty((), dtype=torch.int64).random_()  # DataLoader's _base_seed
        if not self.shuffle or len(self.dataset) == 0:
            return None
        return int(torch.empty((), dtype=torch.int64).random_().item())

    def permutation(self, seed: int | None) -> torch.Tensor | None:
        """The pass's window order as a tensor (None: in order). Kept as a tensor, not a list: a
        prepared corpus can have tens of millions of windows."""
        import torch

        if seed is None:
            return None
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.randperm(len(self.dataset), generator=generator)

    def order(self, seed: int | None) -> list[int]:
        permutation = self.permutation(seed)
        return list(range(len(self.dataset))) if permutation is None else permutation.tolist()

    def batches(self, seed: int | None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The pass fixed by `seed`, from batch `start` on. With several ranks, each rank gets its
        contiguous share of every global batch."""
        permutation = self.permutation(seed)
        n = len(self.dataset)
        for b in range(start, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            indices = list(range(lo, hi)) if permutation is None else permutation[lo:hi].tolist()
            if self.world_size > 1:
                per_rank = len(indices) // self.world_size
                indices = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield self.dataset.batch(indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.draw_order_seed())


class RandomWindowLoader:
    """nanoGPT-style sampling: each optimizer step takes `batch_size` windows starting at uniformly
    random token offsets (any offset, not only multiples of the stride).

    Step s draws from a generator seeded with (seed, s) alone, so a resumed run draws what an
    uninterrupted one does, every rank draws the same global batch (and takes its contiguous share),
    and torch's global RNG is left alone.
    """

    def __init__(
        self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset = WindowDataset(tokens, context_length, 1)  # window i starts at token i
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.dataset), size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts(step).tolist()
        if self.world_size > 1:
            per_rank = len(starts) // self.world_size
            starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        return self.dataset.batch(starts)

    def batches(self, first_step: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(first_step, first_step + count):
            yield self.batch(step)


def prepared_splits(directory: str | Path) -> Splits:
    """The memory-mapped train.bin and val.bin of a `gptcli prepare` directory, checked against its
    meta.json (an interrupted or altered directory is refused, not half-read)."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        dtype = np.dtype(meta["dtype"])
        parts = [(meta[name]["file"], int(meta[name]["tokens"])) for name in ("train", "val")]
        vocab_size = int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GptcliError(f"{directory / 'meta.json'} is incomplete or invalid ({exc})") from None
    arrays = []
    for file, tokens in parts:
        path = directory / file
        expected = tokens * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise GptcliError(
                f"{path} {found} but meta.json says {tokens:,} {dtype} tokens ({expected:,} bytes): the data "
                f"is incomplete or was changed; prepare it again with `gptcli prepare TEXT --out {directory} --force`"
            )
        # Read-only map: pages come from the file on demand, the corpus is never loaded whole.
        array = np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype=dtype)
        check_token_ids(array, vocab_size, str(path), "meta.json's vocabulary")
        arrays.append(array)
    return Splits(arrays[0], arrays[1], str(directory), vocab_size)


def is_prepared_dir(path: str | Path) -> bool:
    """A directory given as a corpus is taken for prepared data (and refused clearly if it is not)."""
    return Path(path).is_dir()


def load_splits(corpus: str | Path, tokenizer: tiktoken.Encoding, train_ratio: float = 0.9) -> Splits:
    """Training and validation tokens: of a text file (split by characters, as the chapter does), or
    the memory-mapped files of a `gptcli prepare` directory (whose split prepare fixed)."""
    if is_prepared_dir(corpus):
        return prepared_splits(corpus)
    splits = text_splits(corpus, tokenizer, train_ratio)
    splits.vocab_size = tokenizer.n_vocab
    return splits


# --- a training run's loaders -------------------------------------------------------------------


@dataclass
class TrainingData:
    """A run's data and the shape of its loop, all checked before anything is written."""

    tokenizer: tiktoken.Encoding
    train_loader: BatchLoader
    val_loader: BatchLoader
    sampler: RandomWindowLoader | None  # random sampling's windows (None: the chapter's epochs)
    steps_per_epoch: int
    epochs: float  # math.inf: random sampling bounded by --max-steps alone
    total_steps: int
    accumulation: int  # micro-batches per optimizer step
    micro: int  # sequences per micro-batch


def micro_batches(settings: TrainSettings, world_size: int) -> tuple[int, int]:
    """(micro-batches per step, sequences per micro-batch) on each process."""
    per_rank, remainder = divmod(settings.batch_size, world_size)
    if remainder:
        raise UsageError(
            f"--batch-size {settings.batch_size} is not divisible by the {world_size} processes"
        )
    micro = settings.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(
            f"--micro-batch-size {micro} must divide the per-process batch of {per_rank} sequences"
        )
    return per_rank // micro, micro


def load_training_data(settings: TrainSettings, dist: Distributed) -> TrainingData:
    """The tokenizer and the run's loaders (this rank's share of each batch), and the loop's length."""
    from gptcli.tokenizer import get_tokenizer

    config = settings.config
    accumulation, micro = micro_batches(settings, dist.world_size)
    tokenizer = get_tokenizer()
    splits = load_splits(settings.corpus, tokenizer, settings.train_ratio)
    _check_enough_data(splits, settings, is_prepared_dir(settings.corpus))
    if splits.vocab_size and splits.vocab_size > config.vocab_size:
        raise UsageError(
            f"--vocab-size {config.vocab_size} is smaller than the data's vocabulary ({splits.vocab_size}): "
            "its token ids would not fit the embedding"
        )
    stride = settings.stride or config.context_length
    train_loader = BatchLoader(
        WindowDataset(splits.train, config.context_length, stride),
        settings.batch_size, shuffle=True, drop_last=True, rank=dist.rank, world_size=dist.world_size,
    )
    val_loader = BatchLoader(
        WindowDataset(splits.val, config.context_length, stride), settings.batch_size,
        shuffle=False, drop_last=False,
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise _too_few_windows(settings, len(train_loader.dataset))
    # Random sampling has no passes: an "epoch" is as many steps as one pass would take (for the
    # per-epoch sample, checkpoint and the plots), and --max-steps alone sets the length.
    random_sampling = settings.sampling == "random"
    sampler = RandomWindowLoader(
        splits.train, config.context_length, settings.batch_size, settings.seed, dist.rank, dist.world_size,
    ) if random_sampling else None
    epochs = math.inf if random_sampling and settings.max_steps else settings.epochs
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps:
        total_steps = settings.max_steps if random_sampling else min(total_steps, settings.max_steps)
    return TrainingData(tokenizer, train_loader, val_loader, sampler, steps_per_epoch, epochs, total_steps,
                        accumulation, micro)


def _check_enough_data(splits: Splits, settings: TrainSettings, prepared: bool) -> None:
    context = settings.config.context_length
    if prepared and min(len(splits.train), len(splits.val)) <= context:
        which = "training" if len(splits.train) <= context else "validation"
        raise UsageError(
            f"not enough tokens for the {which} loader in {settings.corpus} ({len(splits.train)} training, "
            f"{len(splits.val)} validation tokens, context length {context}); lower --context-length or "
            "prepare more text (`gptcli prepare --val-ratio` sets the split)"
        )
    check_enough_tokens(splits, context)


def _too_few_windows(settings: TrainSettings, windows: int) -> UsageError:
    options = "--batch-size or --context-length"
    if settings.stride and settings.stride > settings.config.context_length:
        options = f"--stride ({settings.stride}), --batch-size or --context-length"
    return UsageError(
        f"the training split has {windows} windows, fewer than one batch of {settings.batch_size}; lower {options}"
    )
