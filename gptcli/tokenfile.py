"""The token-file format of `gptcli prepare` directories: `train.bin` and `val.bin` (flat token ids,
uint16 or uint32, memory-mappable) described by `meta.json`; writing one file and reading the
metadata back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    import numpy as np

META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
FORMAT = "gptcli-tokens"
DTYPES = ("uint16", "uint32")


class TokenFile:
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


def move_tail(source: TokenFile, target: TokenFile, keep: int, block: int = 1 << 20) -> None:
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


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared directory, with a clear error when it is missing or broken."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise GptcliError(
            f"{directory} has no {META_FILE}: not the output of a finished `gptcli prepare` (an interrupted "
            f"run leaves none); prepare it again with `gptcli prepare TEXT --out {directory} --force`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GptcliError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptcliError(f"{path} is not gptcli prepared-data metadata")
    return meta
