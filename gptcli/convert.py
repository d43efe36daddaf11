"""Convert GPT-2 weights between OpenAI's TensorFlow checkpoints, Hugging Face, gptcli, the book's
state dicts and llama.cpp's GGUF.

What each format is lives in its module under `gptcli.formats` (see the table in
`gptcli.formats.registry`). Here: pick the reader (`--from`, or detected from the files present),
make its plan, which validates the source completely before any output is opened, decide where the
output goes, and hand the plan to the writer (`--to`), which writes it one tensor at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gptcli.choices import GGUF_TYPES, SOURCE_FORMATS, TARGET_FORMATS
from gptcli.config import GPTConfig
from gptcli.durable import check_output
from gptcli.errors import GptcliError, UsageError
from gptcli.formats.plan import ConversionPlan, ProgressCallback, ReadOptions, WriteOptions
from gptcli.formats.registry import READERS, WRITERS, detect_format
from gptcli.modelfile import MODEL_FILE
from gptcli.paths import check_can_create, not_found

__all__ = ["ConvertResult", "convert", "default_output", "detect_format", "make_plan"]


def make_plan(
    source: str | Path, source_format: str = "auto", verify_checksums: bool = True, n_heads: int | None = None
) -> ConversionPlan:
    """The plan of `source`, read as `source_format` (auto: detected from the files present)."""
    source = Path(source)
    if source_format not in SOURCE_FORMATS:
        raise UsageError(f"unknown source format {source_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if source_format == "auto":
        source_format = detect_format(source)
    elif not source.exists() and not Path(f"{source}.index").exists():
        raise GptcliError(not_found(source))
    return READERS[source_format].read_plan(source, ReadOptions(verify_checksums, n_heads))


def default_output(source: Path, source_format: str, target: str) -> Path:
    """Where `convert` writes without --out: beside OpenAI's files as model.safetensors (so the
    release directory itself works as `--model`); otherwise in the current directory."""
    stem = source.name if source.is_dir() else source.stem
    if target == "hf":
        return Path(f"{stem}-hf")
    if target == "gguf":
        return Path(f"{stem}.gguf")
    if target == "book":
        return Path(f"{stem}-book.safetensors")
    if source_format == "openai":
        return (source if source.is_dir() else source.parent) / MODEL_FILE
    return Path(f"{stem}.safetensors")


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: from what, to what and where, and what it wrote."""

    source: str
    source_format: str
    target_format: str
    output: Path
    config: GPTConfig
    num_tensors: int
    num_bytes: int
    notes: tuple[str, ...] = ()


def convert(
    source: str | Path,
    out: str | Path | None = None,
    source_format: str = "auto",
    target_format: str = "gptcli",
    verify_checksums: bool = True,
    on_tensor: ProgressCallback | None = None,
    force: bool = False,
    n_heads: int | None = None,
    gguf_type: str = "f32",
) -> ConvertResult:
    """Convert `source` to a gptcli model file, a Hugging Face directory ("hf"; one that already holds
    files is written into only with `force`), the chapter's state dict ("book", see
    gptcli.formats.book) or a llama.cpp GGUF file ("gguf", gptcli.formats.gguf)."""
    _check_targets(target_format, gguf_type)
    if target_format == "hf" and not force:
        _check_empty_dir(Path(out) if out is not None else default_output(Path(source), "", "hf"))
    plan = make_plan(source, source_format, verify_checksums, n_heads)
    if n_heads is not None and plan.source_format != "book":
        raise UsageError(f"--n-heads applies to the book's files only; {plan.source_format} files say their heads")
    output = _output_path(Path(source), out, plan, target_format, force)
    try:
        WRITERS[target_format].write(plan, output, WriteOptions(gguf_type), on_tensor)
    except OSError as exc:
        raise GptcliError(f"cannot write {output}: {exc.strerror or exc}") from None
    return ConvertResult(
        plan.source,
        plan.source_format,
        target_format,
        output,
        plan.config,
        len(plan.tensors),
        plan.num_bytes,
        tuple(plan.notes),
    )


def _check_targets(target_format: str, gguf_type: str) -> None:
    if target_format not in TARGET_FORMATS:
        raise UsageError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")


def _output_path(
    source: Path, out: str | Path | None, plan: ConversionPlan, target_format: str, force: bool
) -> Path:
    """--out (a gptcli model goes into a directory as model.safetensors), else the default; never
    the source itself, only where it can be created, and an existing file only with --force."""
    output = Path(out) if out is not None else default_output(source, plan.source_format, target_format)
    if target_format == "gptcli" and output.is_dir():
        output = output / MODEL_FILE
    if _same_file(output, source) or _same_file(output, Path(plan.source)):
        raise UsageError(f"refusing to overwrite the source {plan.source} with its conversion; pass --out")
    check_can_create(output)
    if target_format != "hf":
        check_output(output, replace=force)
    return output


def _check_empty_dir(out_dir: Path) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UsageError(
            f"{out_dir} is not empty; pass --force to write config.json and model.safetensors into it "
            "(replacing those two files, keeping the others)"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
