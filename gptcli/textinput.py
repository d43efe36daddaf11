"""Text input: files and stdin as strict UTF-8, the documents `prepare` reads (files named, files
under directories, stdin), and streaming a document in chunks cut where cutting cannot change its
GPT-2 tokens (see `safe_cut`)."""

from __future__ import annotations

import codecs
import errno
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gptcli.errors import GptcliError, UsageError
from gptcli.paths import display_path, not_found

STDIN = "-"  # how stdin is named on the command line
STDIN_NAME = "<stdin>"


def not_utf8(name: str, byte: int, offset: int, hint: str = "") -> GptcliError:
    """The one error for text that is not UTF-8, naming the source, the byte and where it is."""
    message = f"{name} is not UTF-8 text (invalid byte 0x{byte:02x} at offset {offset})"
    return GptcliError(f"{message}; {hint}" if hint else message)


def decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(name, raw[exc.start], exc.start) from None


def stdin_bytes() -> BinaryIO:
    """stdin's byte stream, or a one-line error when the process was started without one."""
    import sys

    if sys.stdin is None:
        raise GptcliError(f"cannot read {STDIN_NAME}: standard input is closed")
    return sys.stdin.buffer


def read_stdin_text() -> str:
    """All of stdin as strict UTF-8: the text stream's own decoding would let invalid bytes through
    as surrogates under a C locale (Python's surrogateescape)."""
    import sys

    if sys.stdin is not None and getattr(sys.stdin, "buffer", None) is None:
        return sys.stdin.read()  # a replaced stdin without bytes underneath (already text)
    try:
        return decode_utf8(stdin_bytes().read(), STDIN_NAME)
    except OSError as exc:
        raise GptcliError(f"cannot read {STDIN_NAME}: {exc.strerror}") from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a one-line error saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise GptcliError(not_found(path, "corpus"))
    if path.is_dir():
        raise GptcliError(f"{path} is a directory, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GptcliError(f"cannot read {path}: {exc.strerror}") from None
    text = decode_utf8(raw, str(path))
    if not text.strip():
        raise UsageError(f"{path} is empty")  # bad input, as an empty stdin is
    return text


# What `\s` matches in tiktoken's (Rust) regex: Unicode White_Space. Python's str.isspace() is a
# superset, which makes `not isspace()` a safe (conservative) test for "not whitespace".
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_ANY_CUT = re.compile(f"[{re.escape(_WHITESPACE)}](?=\\S)")


# --- documents ---------------------------------------------------------------------------------


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
        sources.append(Source(display_path(path), path, size))

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
        else:
            raise GptcliError(_unreadable_input(path))
    return sources


def _unreadable_input(path: Path) -> str:
    """What is wrong with an input that is neither a file nor a directory."""
    try:
        path.stat()
    except OSError as exc:
        if path.is_symlink() or exc.errno == errno.ENOENT:
            return not_found(path, "input")
        return f"cannot read {path}: {exc.strerror}"
    return f"{path} is neither a file nor a directory"


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


# --- chunking ----------------------------------------------------------------------------------


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


class ChunkReader:
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
