"""The table of formats: which module reads, writes and describes each, and how a path's format is
told from the files present. `gptcli.convert` and `gptcli.info` dispatch through it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gptcli.errors import GptcliError, UsageError
from gptcli.formats import book, gguf, hf, openai
from gptcli.formats import gptcli as gptcli_format
from gptcli.formats.plan import ConversionPlan, Description, ProgressCallback, ReadOptions, WriteOptions
from gptcli.paths import not_found


class Format(Protocol):
    """What every format module has: its name, a test for its files and what `gptcli info` shows."""

    NAME: str

    def detect(self, path: Path) -> bool: ...

    def describe(self, path: Path, options: ReadOptions) -> Description: ...


class Readable(Format, Protocol):
    """A format `convert` reads (`--from`)."""

    def read_plan(self, path: Path, options: ReadOptions) -> ConversionPlan: ...


class Writable(Format, Protocol):
    """A format `convert` writes (`--to`)."""

    def write(
        self, plan: ConversionPlan, out: Path, options: WriteOptions, on_tensor: ProgressCallback | None = None
    ) -> Path: ...


READERS: dict[str, Readable] = {"openai": openai, "hf": hf, "gptcli": gptcli_format, "book": book}
WRITERS: dict[str, Writable] = {"gptcli": gptcli_format, "hf": hf, "book": book, "gguf": gguf}
FORMATS: dict[str, Format] = {**READERS, **WRITERS}

# The order detection asks the formats in; the first to recognise a path names its format. A file is
# gptcli's only if its metadata says so and the chapter's only if its keys are; any other
# `.safetensors` is taken for Hugging Face's. A directory holding config.json is Hugging Face's even
# when it also holds a model.safetensors.
FILE_ORDER: tuple[Readable, ...] = (gptcli_format, book, hf)
DIRECTORY_ORDER: tuple[Readable, ...] = (hf, gptcli_format)


def detect_format(source: Path) -> str:
    """openai, hf, gptcli or book, from the files present."""
    if openai.detect(source):  # first: a checkpoint prefix names no file of its own
        return openai.NAME
    if not source.exists():
        raise GptcliError(not_found(source))
    order = FILE_ORDER if source.is_file() else DIRECTORY_ORDER if source.is_dir() else ()
    for candidate in order:
        if candidate.detect(source):
            return candidate.NAME
    if source.is_file():
        raise UsageError(f"cannot tell the format of {source}; pass --from openai|hf|gptcli|book")
    if (source / openai.HPARAMS).is_file():
        raise GptcliError(f"{source} has hparams.json but no checkpoint index (*.index); is the download complete?")
    raise GptcliError(
        f"{source} holds no known model: expected OpenAI's hparams.json + model.ckpt.*, "
        "Hugging Face's config.json + model.safetensors, or a gptcli model.safetensors"
    )
