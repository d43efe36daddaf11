"""gptcli's own model files: a `.safetensors` with the model config in its metadata (see
`gptcli.modelfile`), or a directory holding one as `model.safetensors`. Read and written."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gptcli.config import model_shapes
from gptcli.durable import atomic_write
from gptcli.errors import GptcliError
from gptcli.formats.plan import (
    ConversionPlan,
    Description,
    ProgressCallback,
    ReadOptions,
    TensorPlan,
    WriteOptions,
    check_shape,
)
from gptcli.formats.safetensors_io import (
    safetensors_dtypes,
    safetensors_loader,
    safetensors_names,
    safetensors_shape,
    write_safetensors_stream,
)
from gptcli.modelfile import FORMAT, MODEL_FILE, load_config, read_metadata, resolve_model_path

NAME = "gptcli"


def detect(path: Path) -> bool:
    """A `.safetensors` whose metadata says gptcli wrote it, or a directory holding `model.safetensors`."""
    if path.is_dir():
        return (path / MODEL_FILE).is_file()
    return path.is_file() and path.suffix == ".safetensors" and read_metadata(path).get("format") == FORMAT


def read_plan(source: Path, options: ReadOptions) -> ConversionPlan:
    """A plan reading a gptcli model file (or a run directory holding model.safetensors)."""
    path = resolve_model_path(source)
    config = load_config(path)
    names = safetensors_names(path)
    tensors = []
    for name, shape in model_shapes(config).items():
        if name not in names:
            raise GptcliError(f"{path}: tensor {name} is missing")
        check_shape(safetensors_shape(path, name), shape, name, str(path))
        tensors.append(TensorPlan(name, shape, safetensors_loader(path, name)))
    return ConversionPlan(config, tensors, str(path), NAME)


def write(plan: ConversionPlan, out: Path, options: WriteOptions, on_tensor: ProgressCallback | None = None) -> Path:
    """Write `plan` as a gptcli model file (what `gptcli.modelfile.load_model` reads), atomically."""
    metadata = {**plan.extra, "format": FORMAT, "config": plan.config.to_json(), "converted_from": plan.source_format}
    names = {t.name: t.name for t in plan.tensors}
    atomic_write(out, lambda tmp: write_safetensors_stream(tmp, plan.tensors, metadata, names, on_tensor))
    return out


def saved_at(path: Path) -> str:
    """When `path` was last written, in UTC, as ISO 8601."""
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(timespec="seconds")


def describe(source: Path, options: ReadOptions) -> Description:
    path = resolve_model_path(source)
    metadata = read_metadata(path)
    origin: dict[str, Any] = {}
    if "converted_from" in metadata:
        origin["converted_from"] = metadata["converted_from"]
    if "step" in metadata:
        origin["step"] = int(metadata["step"])
    if "book_optimizer_steps" in metadata:
        origin["book_optimizer_steps"] = int(metadata["book_optimizer_steps"])
    origin["saved"] = saved_at(path)
    return Description(load_config(path), [path], safetensors_dtypes([path]), origin)
