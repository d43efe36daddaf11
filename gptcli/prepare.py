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

import codecs
import hashlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from gptcli import __version__
from gptcli.choices import DECODE_ERRORS, SPLIT_MODES
from gptcli.data import STDIN_NAME
from gptcli.errors import GptcliError, UsageError
from gptcli.paths import check_can_create
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import numpy as np
    import tiktoken

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
FORMAT = "gptcli-tokens"
STDIN = "-"
DEFAULT_CHUNK_SIZE = 1 << 20  # bytes read per block and characters per tokenized chunk
DTYPES = ("uint16", "uint32")

# What `\s` matches in tiktoken's (Rust) regex: Unicode White_Space. Python's str.isspace() is a
# superset, which makes `not isspace()` a safe (conservative) test for "not whitespace".
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_ANY_CUT = re.compile(f"[{re.escape(_WHITESPACE)}](?=\\S)")


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


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Source:
    """One document: a file, or stdin (path None)."""

    name: str
    path: Path | None
    size: int | None  # bytes; None for stdin until read
    sha256: str = ""
    tokens: int = 0
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.name, "bytes": self.size, "sha256": self.sha256, "tokens": self.tokens,
                "split": self.split}


def collect_sources(inputs: Sequence[str | Path], glob: str = "*.txt", exclude: Path | None = None) -> list[Source]:
    """Files named, files under directories (recursively, matching `glob`, sorted), and stdin for
    '-'; each file once. `exclude` (the output directory) is skipped when walking directories."""
    if not inputs:
        raise UsageError("no inputs: give text files, directories, or '-' for stdin")
    if sum(1 for i in inputs if str(i) == STDIN) > 1:
        raise UsageError("stdin ('-') can be read only once")
    excluded = exclude.resolve() if exclude is not None else None
    sources: list[Source] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise GptcliError(f"cannot read {path}: {exc.strerror}") from None
        sources.append(Source(str(path), path, size))

    for item in inputs:
        if str(item) == STDIN:
            sources.append(Source(STDIN_NAME, None, None))
            continue
        path = Path(item)
        if path.is_dir():
            for p in _files_under(path, glob, excluded):
                add(p)
        elif path.is_file():
            add(path)
        elif path.exists():
            raise GptcliError(f"{path} is neither a file nor a directory")
        else:
            raise GptcliError(f"input not found: {path}")
    return sources


def _files_under(directory: Path, glob: str, excluded: Path | None) -> list[Path]:
    """The files under `directory` matching `glob`, sorted, leaving out hidden ones and `excluded`."""
    found = sorted(
        p for p in directory.rglob(glob)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and (excluded is None or excluded not in p.resolve().parents)
    )
    if not found:
        raise GptcliError(f"no files matching {glob!r} under {directory} (change --glob)")
    return found


# --- chunking -----------------------------------------------------------------------------------


def safe_cut(text: str, start: int = 1) -> int:
    """The last index i >= max(start, 1) at which `text` can be cut so that tokenizing text[:i] and
    text[i:] separately gives exactly the tokens of text; 0 when there is none.

    Such a place is a whitespace character followed by a non-whitespace one. GPT-2's pre-tokenizer
    regex (`... | ?\\p{L}+ | ... |\\s+(?!\\S)|\\s`) then ends a piece just before it in the whole text
    (the run of whitespace before it is one piece; it starts the next) and the halves split into the
    same pieces, and BPE never merges across pieces. Line breaks are preferred, then spaces.
    """
    start = max(start, 1)
    last = len(text) - 1  # the character after the cut must exist
    for separator in ("\n", " "):
        i = text.rfind(separator, start, last)
        while i >= start:
            if not text[i + 1].isspace():
                return i
            i = text.rfind(separator, start, i)
    found = 0
    for match in _ANY_CUT.finditer(text, start, last + 1):
        found = match.start()
    return found


class _Reader:
    """A document's text in chunks of about `chunk_size` characters, cut at safe places, with the
    byte count and sha256 of what was read."""

    def __init__(self, stream: BinaryIO, name: str, chunk_size: int, errors: str) -> None:
        self.stream = stream
        self.name = name
        self.chunk_size = chunk_size
        self.errors = errors
        self.bytes_read = 0
        self.hasher = hashlib.sha256()
        self.forced_cuts = 0  # cuts with no safe place nearby (tokens at the cut may differ)

    def chunks(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors=self.errors)
        pending = ""
        while True:
            try:
                block = self.stream.read(self.chunk_size)
            except OSError as exc:
                raise GptcliError(f"cannot read {self.name}: {exc.strerror}") from None
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                from gptcli.data import not_utf8

                offset = self.bytes_read - buffered + exc.start
                raise not_utf8(
                    self.name, exc.object[exc.start], offset,
                    "pass --errors replace to read it with U+FFFD in place of invalid bytes",
                ) from None
            self.bytes_read += len(block)
            self.hasher.update(block)
            pending += text
            while len(pending) >= self.chunk_size:
                # Prefer a cut in the second half, so chunks stay large; look further back if needed.
                cut = safe_cut(pending, len(pending) // 2) or safe_cut(pending)
                if not cut:
                    if len(pending) < 4 * self.chunk_size:
                        break  # read more: a safe place may come
                    # No whitespace at all for megabytes: cutting anywhere may change a few tokens
                    # at the cut, but memory must stay bounded.
                    cut = 2 * self.chunk_size
                    self.forced_cuts += 1
                yield pending[:cut]
                pending = pending[cut:]
            if not block:
                break
        if pending:
            yield pending


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


class _TokenFile:
    """Token ids appended to a temporary file; documents separated by `<|endoftext|>`."""

    def __init__(self, path: Path, dtype: np.dtype, eot: int) -> None:
        import numpy as np

        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/discard)
        self.dtype = dtype
        self.eot = np.array([eot], dtype=dtype)
        self.tokens = 0
        self.documents = 0

    def write(self, tokens: np.ndarray, new_document: bool) -> None:
        if new_document:
            if self.documents:
                self.file.write(self.eot.tobytes())
                self.tokens += 1
            self.documents += 1
        self.file.write(tokens.data)  # the array's buffer, no copy
        self.tokens += len(tokens)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _move_tail(source: _TokenFile, target: _TokenFile, keep: int, block: int = 1 << 20) -> None:
    """Move tokens keep.. of `source` (closed first, so all of it is on disk) to the end of `target`
    in blocks (bounded memory), then cut `source` to `keep` tokens."""
    source.close()
    itemsize = source.dtype.itemsize
    with open(source.tmp, "r+b") as handle:
        handle.seek(keep * itemsize)
        while data := handle.read(block * itemsize):
            target.file.write(data)
        handle.truncate(keep * itemsize)
        os.fsync(handle.fileno())
    moved = source.tokens - keep
    source.tokens = keep
    target.tokens += moved


def check_vocab_fits(vocab_size: int, dtype: str) -> None:
    import numpy as np

    limit = int(np.iinfo(np.dtype(dtype)).max) + 1
    if vocab_size > limit:
        raise UsageError(
            f"the tokenizer's vocabulary ({vocab_size:,} ids) does not fit {dtype} (at most {limit:,} ids)"
        )


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
            self.train = _TokenFile(out_dir / TRAIN_FILE, self.dtype, eot)
        except OSError as exc:
            raise GptcliError(f"cannot write to {out_dir}: {exc.strerror}") from None
        try:
            self.val = _TokenFile(out_dir / VAL_FILE, self.dtype, eot)
        except OSError as exc:
            self.train.discard()
            raise GptcliError(f"cannot write to {out_dir}: {exc.strerror}") from None

    def split(self, mode: str, val_ratio: float) -> None:
        """Checks that both splits hold tokens; by position, moves the last `val_ratio` to val."""
        train, val = self.train, self.val
        if train.tokens + val.tokens == 0:
            raise GptcliError("no text in the inputs: nothing to prepare")
        if mode == "position":
            _move_tail(train, val, int(train.tokens * (1.0 - val_ratio)))
        if val.tokens == 0 or train.tokens == 0:
            raise GptcliError(
                f"the {'validation' if val.tokens == 0 else 'training'} split is empty "
                f"({self.documents(mode)} document(s), {train.tokens + val.tokens} tokens); "
                "add text, change --val-ratio or use --split-by position"
            )

    def documents(self, mode: str) -> int:
        return self.train.documents + self.val.documents if mode == "document" else self.train.documents

    def commit(self, meta: dict[str, Any]) -> None:
        from gptcli.checkpoint import atomic_write_text

        self.train.close()
        self.val.close()
        os.replace(self.val.tmp, self.val.path)
        os.replace(self.train.tmp, self.train.path)
        atomic_write_text(self.dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

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
        self.in_flight: deque[tuple[Any, _TokenFile, Source, bool, int]] = deque()
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
            reader = _Reader(stream, source.name, chunk_size, errors)
            target: _TokenFile | None = None
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

    def _target(self, source: Source) -> _TokenFile:
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
        import sys

        yield stdin if stdin is not None else sys.stdin.buffer
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


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared directory, with a clear error when it is missing or broken."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise GptcliError(
            f"{directory} has no {META_FILE}: not the output of a finished `gptcli prepare` (an interrupted "
            "run leaves none); run `gptcli prepare` again"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GptcliError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptcliError(f"{path} is not gptcli prepared-data metadata")
    return meta
