"""What OpenAI's and Hugging Face's GPT-2 files share: the names of a block's tensors, the Conv1D
weights stored (in, out), the config fields, and the config of a converted GPT-2.

That config is `qkv_bias=True, tie_weights=True` and `drop_rate=0.1`: the dropout GPT-2 was trained
with (and Hugging Face's default). It only matters when the model is trained further
(`train --init`); `sample` and `eval` run in eval mode, where dropout is off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.config import GPTConfig
from gptcli.errors import GptcliError

GPT2_DROP_RATE = 0.1


def gpt2_block_names(i: int) -> dict[str, tuple[str, bool]]:
    """gptcli name -> (GPT-2 name relative to block i, is a Conv1D weight to transpose)."""
    p = f"blocks.{i}."
    return {
        p + "norm1.weight": ("ln_1/g", False),
        p + "norm1.bias": ("ln_1/b", False),
        p + "att.qkv.weight": ("attn/c_attn/w", True),
        p + "att.qkv.bias": ("attn/c_attn/b", False),
        p + "att.out_proj.weight": ("attn/c_proj/w", True),
        p + "att.out_proj.bias": ("attn/c_proj/b", False),
        p + "norm2.weight": ("ln_2/g", False),
        p + "norm2.bias": ("ln_2/b", False),
        p + "ff.fc.weight": ("mlp/c_fc/w", True),
        p + "ff.fc.bias": ("mlp/c_fc/b", False),
        p + "ff.proj.weight": ("mlp/c_proj/w", True),
        p + "ff.proj.bias": ("mlp/c_proj/b", False),
    }


def conv_to_linear(array: np.ndarray, name: str, where: str) -> np.ndarray:
    """GPT-2's Conv1D weights are (in, out), OpenAI's with a leading 1; torch Linear wants (out, in)."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise GptcliError(f"{where}: {name} has shape {list(array.shape)}, expected a 2-D weight")
    return np.ascontiguousarray(array.T)


def source_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    """The shape GPT-2's files store for a gptcli tensor of `shape` (a Conv1D weight transposed)."""
    return (shape[1], shape[0]) if transpose else shape


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptcliError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GptcliError(f"{path} is not a JSON object")
    return data


def int_field(data: dict[str, Any], keys: tuple[str, ...], path: Path) -> int:
    """The first of `keys` present in `data` as a positive integer (its other spellings after it)."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise GptcliError(f"{path}: {key} must be positive, got {value}")
            return value
    raise GptcliError(f"{path}: missing integer field {keys[0]}")


def gpt2_config(
    vocab: int,
    ctx: int,
    emb: int,
    heads: int,
    layers: int,
    where: Path,
    tie_weights: bool = True,
    drop_rate: float = GPT2_DROP_RATE,
) -> GPTConfig:
    """The config of a GPT-2 read from `where`, its errors naming that file."""
    try:
        return GPTConfig(
            vocab_size=vocab,
            context_length=ctx,
            emb_dim=emb,
            n_heads=heads,
            n_layers=layers,
            qkv_bias=True,
            tie_weights=tie_weights,
            drop_rate=drop_rate,
        )
    except GptcliError as exc:
        raise GptcliError(f"{where}: {exc.message}") from None
