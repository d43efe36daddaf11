"""safetensors files, as the formats that store them (gptcli's, Hugging Face's, the book's) read and
write them: tensors read one at a time, and files written one tensor at a time."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.errors import GptcliError
from gptcli.formats.plan import ProgressCallback, TensorPlan


def safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise GptcliError(f"{path} is not a readable safetensors file ({exc})") from None


def safetensors_shape(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def safetensors_loader(path: Path, name: str) -> Callable[[], np.ndarray]:
    """A loader reading just `name`, as float32, when called."""

    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except Exception as exc:
            raise GptcliError(f"{path}: cannot read {name} ({exc})") from None
        return tensor.to(torch.float32).numpy()

    return load


def safetensors_dtypes(paths: list[Path]) -> list[str]:
    """The dtypes stored in `paths`, sorted (torch's names without the `torch.` prefix)."""
    from safetensors import safe_open

    dtypes: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update(str(handle.get_slice(name).get_dtype()) for name in handle.keys())
    return sorted(dtypes)


def write_safetensors_stream(
    tmp: Path,
    tensors: list[TensorPlan],
    metadata: dict[str, str],
    names: dict[str, str],
    on_tensor: ProgressCallback | None,
) -> None:
    """Write a safetensors file one tensor at a time (the header is known from the shapes)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        size = 4 * math.prod(tensor.shape)
        header[names[tensor.name]] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for done, tensor in enumerate(tensors):
            array = np.ascontiguousarray(tensor.load(), dtype="<f4")
            if tuple(array.shape) != tuple(tensor.shape):
                raise GptcliError(f"{tensor.name}: read shape {list(array.shape)}, expected {list(tensor.shape)}")
            handle.write(array.data.cast("B"))
            del array
            if on_tensor:
                on_tensor(done + 1, len(tensors), tensor.name)
