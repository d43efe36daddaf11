"""Corpora to token files: the core of `gptcli prepare`.

Every input file (and stdin) is one document. Each document is tokenized with GPT-2's BPE as
ordinary text (`encode_ordinary`: a literal "<|endoftext|>" inside a document is just text, so a
corpus cannot inject special tokens), and documents are separated by the `<|endoftext|>` token
(50256), as in GPT-2's own training data: one between consecutive documents of a split, none before
the first or after the last. The result is `train.bin` and `val.bin` (flat token ids, uint16,
memory-mappable with `np.memmap`) and `meta.json`.

Streaming: files are read in blocks of `chunk_size` bytes and decoded incrementally; text is cut
into chunks only where cutting does not change the tokens (see `safe_cut`), the chunks are tokenized
by a pool of threads (tiktoken releases the GIL) with a bounded number in flight, and the tokens are
written in order. Memory stays bounded by about (workers + 2) chunks whatever the corpus size.

Atomicity: tokens go to `*.bin.tmp` files that are renamed when complete, `meta.json` last; an
existing `meta.json` is removed first when replacing data. A directory without `meta.json`, or whose
files disagree with it, is refused by `gptcli train`, so an interrupted run never looks complete.

The core never prints: `prepare()` yields events and the command renders them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from gptcli import __version__
from gptcli.choices import DECODE_ERRORS, SPLIT_MODES
from gptcli.errors import GptcliError, UsageError
from gptcli.paths import check_can_create
from gptcli.textinput import ChunkReader, Source, collect_sources, stdin_bytes
from gptcli.tokenfile import DTYPES, FORMAT, META_FILE, TRAIN_FILE, VAL_FILE, TokenFile, check_vocab_fits, move_tail
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import numpy as np
    import tiktoken

DEFAULT_CHUNK_SIZE = 1 << 20  # bytes read per block and characters per tokenized chunk


# --- events -------------------------------------------------------------------------------------


@dataclass
class PrepareStarted:
    out_dir: Path
    sources: int
    total_bytes: int | None  # None when reading stdin
    workers: int
    split_by: str


@dataclass
class PrepareProgress:
    bytes_done: int
    tokens_done: int
    source: str


@dataclass
class PrepareFinished:
    out_dir: Path
    meta: dict[str, Any]
    seconds: float
    bytes_read: int
    files: list[Path] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])


PrepareEvent = PrepareStarted | PrepareProgress | PrepareFinished


# --- chunking -----------------------------------------------------------------------------------


# --- tokenization and output --------------------------------------------------------------------


def _encoder(tokenizer: tiktoken.Encoding, dtype: np.dtype) -> Any:
    """text -> token array of `dtype`; encode_to_numpy skips building a Python list (and runs
    without the GIL), equivalent to encode_ordinary when no special token is allowed."""
    import numpy as np

    if hasattr(tokenizer, "encode_to_numpy"):
        def encode(text: str) -> np.ndarray:
            return tokenizer.encode_to_numpy(text, disallowed_special=()).astype(dtype, copy=False)
    else:  # older tiktoken
        def encode(text: str) -> np.ndarray:
            return np.asarray(tokenizer.encode_ordinary(text), dtype=dtype)
    return encode


def choose_split(split_by: str, documents: int, val_ratio: float) -> str:
    """'document' when there are enough documents for the validation share to hold at least one
    (and at least two documents), else 'position'."""
    if split_by != "auto":
        return split_by
    return "document" if documents >= max(2, math.ceil(1 / val_ratio)) else "position"


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    val_ratio: float = 0.1,
    split_by: str = "auto",
    glob: str = "*.txt",
    workers: int | None = None,
    errors: str = "strict",
    force: bool = False,
    stdin: BinaryIO | None = None,
    tokenizer: tiktoken.Encoding | None = None,
    dtype: str = "uint16",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Generator[PrepareEvent, None, None]:
    """Tokenize `inputs` into `out_dir`/train.bin, val.bin and meta.json, yielding progress events.

    The validation split takes `val_ratio` of the data: by document (a document goes to val.bin
    whenever val's share of the bytes read so far is below the ratio, so val documents are spread
    through the corpus), or by position (the last `val_ratio` of all tokens, as the chapter splits
    its one text). `split_by='auto'` picks by document when there are many documents.
    """
    _check_options(val_ratio, split_by, errors, dtype, workers, chunk_size)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    sources = collect_sources(inputs, glob, exclude=out_dir)
    if tokenizer is None:
        from gptcli.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    check_vocab_fits(tokenizer.n_vocab, dtype)
    mode = choose_split(split_by, len(sources), val_ratio)
    workers = workers or os.cpu_count() or 1
    output = _Output(out_dir, dtype, _eot_id(tokenizer))
    total_bytes = None if any(s.path is None for s in sources) else sum(s.size or 0 for s in sources)
    job = _Tokenization(output, _encoder(tokenizer, output.dtype), mode, val_ratio, workers)
    started = time.perf_counter()
    try:
        yield PrepareStarted(out_dir, len(sources), total_bytes, workers, mode)
        yield from job.run(sources, stdin, chunk_size, errors)
        meta = _meta(output, tokenizer, mode, val_ratio, errors, job.bytes_read, sources)
        output.commit(meta)
    except OSError as exc:  # reading errors are GptcliErrors already: this is the output (disk full...)
        raise GptcliError(f"cannot write {exc.filename or out_dir}: {exc.strerror}") from None
    finally:
        job.close()
        output.discard()  # nothing left once committed; an interrupted run leaves no partial files
    yield PrepareFinished(out_dir, meta, time.perf_counter() - started, job.bytes_read,
                          [output.train.path, output.val.path, out_dir / META_FILE])


def _check_options(
    val_ratio: float, split_by: str, errors: str, dtype: str, workers: int | None, chunk_size: int
) -> None:
    if not 0.0 < val_ratio < 1.0:
        raise UsageError(f"--val-ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    if split_by not in SPLIT_MODES:
        raise UsageError(f"--split-by must be one of {', '.join(SPLIT_MODES)}, got {split_by!r}")
    if errors not in DECODE_ERRORS:
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if chunk_size < 16:
        raise UsageError(f"chunk size must be at least 16, got {chunk_size}")


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    check_can_create(out_dir)
    existing = [name for name in (META_FILE, TRAIN_FILE, VAL_FILE) if (out_dir / name).exists()]
    if existing and not force:
        raise UsageError(f"{out_dir} already holds prepared data ({', '.join(existing)}); pass --force to replace it")


def _eot_id(tokenizer: Any) -> int:
    return tokenizer.eot_token if getattr(tokenizer, "eot_token", None) is not None else EOT_ID


class _Output:
    """The output directory while it is written: old data removed first (meta.json before anything,
    so the directory does not look finished until the new meta.json is in place), tokens in
    temporary files, renamed into place by `commit`."""

    def __init__(self, out_dir: Path, dtype: str, eot: int) -> None:
        import numpy as np

        self.dir, self.dtype = out_dir, np.dtype(dtype)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in (META_FILE, TRAIN_FILE, VAL_FILE):
                (out_dir / name).unlink(missing_ok=True)
            self.train = TokenFile(out_dir / TRAIN_FILE, self.dtype, eot)
        except OSError as exc:
            raise GptcliError(f"cannot write to {out_dir}: {exc.strerror}") from None
        try:
            self.val = TokenFile(out_dir / VAL_FILE, self.dtype, eot)
        except OSError as exc:
            self.train.discard()
            raise GptcliError(f"cannot write to {out_dir}: {exc.strerror}") from None

    def split(self, mode: str, val_ratio: float) -> None:
        """Checks that both splits hold tokens; by position, moves the last `val_ratio` to val."""
        train, val = self.train, self.val
        if train.tokens + val.tokens == 0:
            raise GptcliError("no text in the inputs: nothing to prepare")
        if mode == "position":
            move_tail(train, val, int(train.tokens * (1.0 - val_ratio)))
        if val.tokens == 0 or train.tokens == 0:
            raise GptcliError(
                f"the {'validation' if val.tokens == 0 else 'training'} split is empty "
                f"({self.documents(mode)} document(s), {train.tokens + val.tokens} tokens); "
                "add text, change --val-ratio or use --split-by position"
            )

    def documents(self, mode: str) -> int:
        return self.train.documents + self.val.documents if mode == "document" else self.train.documents

    def commit(self, meta: dict[str, Any]) -> None:
        from gptcli import durable

        self.train.close()  # fsyncs
        self.val.close()
        durable.replace(self.val.tmp, self.val.path)
        durable.replace(self.train.tmp, self.train.path)
        durable.atomic_write_text(self.dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    def discard(self) -> None:
        self.train.discard()
        self.val.discard()


class _Tokenization:
    """Sources read in blocks, cut into chunks, tokenized by a pool of threads with at most
    workers + 1 chunks in flight, and written in order to the split each document goes to."""

    def __init__(self, output: _Output, encode: Any, mode: str, val_ratio: float, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.output, self.encode, self.mode, self.val_ratio = output, encode, mode, val_ratio
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gptcli-prepare")
        self.max_in_flight = workers + 1
        # (future, target file, source, first chunk of its document?, bytes read when it was cut)
        self.in_flight: deque[tuple[Any, TokenFile, Source, bool, int]] = deque()
        self.bytes_read = 0  # bytes of the sources already read
        self.assigned = {"train": 0, "val": 0}  # bytes of the documents assigned to each split
        self.tokens_done = 0
        self.finished = False

    def run(
        self, sources: list[Source], stdin: BinaryIO | None, chunk_size: int, errors: str
    ) -> Iterator[PrepareEvent]:
        for source in sources:
            yield from self._document(source, stdin, chunk_size, errors)
        while self.in_flight:
            yield self._write_oldest()
        self.output.split(self.mode, self.val_ratio)
        self.finished = True

    def _document(
        self, source: Source, stdin: BinaryIO | None, chunk_size: int, errors: str
    ) -> Iterator[PrepareEvent]:
        with _open_source(source, stdin) as stream:
            reader = ChunkReader(stream, source.name, chunk_size, errors)
            target: TokenFile | None = None
            for chunk in reader.chunks():
                first = target is None
                if target is None:  # the document's first chunk: pick its split
                    target = self._target(source)
                self.in_flight.append((self.executor.submit(self.encode, chunk), target, source, first,
                                       self.bytes_read + reader.bytes_read))
                while len(self.in_flight) >= self.max_in_flight:
                    yield self._write_oldest()
        source.size = reader.bytes_read
        source.sha256 = reader.hasher.hexdigest()
        self.bytes_read += reader.bytes_read
        if target is not None:
            self.assigned["val" if source.split == "val" else "train"] += reader.bytes_read

    def _target(self, source: Source) -> TokenFile:
        assigned = self.assigned
        if self.mode == "document" and assigned["val"] < self.val_ratio * (assigned["train"] + assigned["val"]):
            source.split = "val"
            return self.output.val
        source.split = "train" if self.mode == "document" else None
        return self.output.train

    def _write_oldest(self) -> PrepareProgress:
        future, target, source, first, bytes_done = self.in_flight.popleft()
        tokens = future.result()
        target.write(tokens, first)
        source.tokens += len(tokens)
        self.tokens_done += len(tokens)
        return PrepareProgress(bytes_done, self.tokens_done, source.name)

    def close(self) -> None:
        self.executor.shutdown(wait=not self.finished, cancel_futures=True)


@contextmanager
def _open_source(source: Source, stdin: BinaryIO | None) -> Iterator[BinaryIO]:
    """The document's bytes: its file (closed afterwards), or stdin."""
    if source.path is None:
        yield stdin if stdin is not None else stdin_bytes()
        return
    try:
        handle = open(source.path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise GptcliError(f"cannot read {source.name}: {exc.strerror}") from None
    with handle:
        yield handle


def _meta(
    output: _Output, tokenizer: Any, mode: str, val_ratio: float, errors: str, bytes_read: int,
    sources: list[Source],
) -> dict[str, Any]:
    train, val = output.train, output.val
    by_document = mode == "document"
    return {
        "format": FORMAT,
        "format_version": 1,
        "tokenizer": getattr(tokenizer, "name", "gpt2"),
        "vocab_size": tokenizer.n_vocab,
        "dtype": str(output.dtype),
        "eot_token": int(output.train.eot[0]),
        "encoding": "encode_ordinary per document; documents separated by <|endoftext|>",
        "documents": output.documents(mode),
        "tokens": train.tokens + val.tokens,
        "train": {"file": TRAIN_FILE, "tokens": train.tokens, "documents": train.documents if by_document else None},
        "val": {"file": VAL_FILE, "tokens": val.tokens, "documents": val.documents if by_document else None},
        "split": {"by": mode, "val_ratio": val_ratio},
        "errors": errors,
        "bytes": bytes_read,
        "sources": [s.to_dict() for s in sources],
        "gptcli_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


