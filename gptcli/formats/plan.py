"""What every format module speaks: the conversion plan a reader makes and a writer consumes, the
options readers and writers take, and what `gptcli info` learns about a file (`Description`).

A plan lists gptcli's tensor names and shapes, each with a loader that reads just that tensor. A
reader validates the source completely (every tensor present, every shape right) while making the
plan, before any output is opened; a writer then loads one tensor at a time, so peak memory stays
near the largest tensor rather than the whole model, and a failure leaves no output behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.config import GPTConfig
from gptcli.errors import GptcliError

ProgressCallback = Callable[[int, int, str], None]  # (tensors done, tensors in all, name)


@dataclass
class TensorPlan:
    """One output tensor: its name, shape and how to read it (as float32)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass
class ConversionPlan:
    """A whole model, ready to be written: its config and tensors, and where they come from."""

    config: GPTConfig
    tensors: list[TensorPlan]
    source: str
    source_format: str
    extra: dict[str, str] = field(default_factory=dict)  # metadata for the gptcli output
    notes: list[str] = field(default_factory=list)  # what the user should know about the conversion

    @property
    def num_bytes(self) -> int:
        return sum(4 * math.prod(t.shape) for t in self.tensors)


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need beyond the path: each format uses the options that concern it."""

    verify_checksums: bool = True  # OpenAI's: check the CRC-32C of every tensor read
    n_heads: int | None = None  # the book's: the attention heads, which its shapes do not tell


@dataclass(frozen=True)
class WriteOptions:
    """What a writer may need beyond the plan and the output path (GGUF's alone, so far)."""

    gguf_type: str = "f32"  # the type of GGUF's matrices
    gguf_bpe_dir: Path | None = None  # GPT-2's BPE files to embed in a GGUF (None: gptcli's own)


@dataclass(frozen=True)
class Description:
    """What a format module tells `gptcli info` about a file (the report adds the parameter counts)."""

    config: GPTConfig
    files: list[Path]
    dtypes: list[str]
    origin: dict[str, Any]


def check_shape(actual: tuple[int, ...], expected: tuple[int, ...], name: str, where: str) -> None:
    """A stored shape against the config's; GPT-2's (1, in, out) Conv1D weights count as (in, out)."""
    squeezed = actual[1:] if len(actual) == 3 and actual[0] == 1 and len(expected) == 2 else actual
    if tuple(squeezed) != tuple(expected):
        raise GptcliError(
            f"{where}: {name} has shape {list(actual)}, expected {list(expected)} (from the model config)"
        )
