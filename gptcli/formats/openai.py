"""OpenAI's GPT-2 release: `hparams.json` beside a TensorFlow checkpoint (`model.ckpt.index` and
`model.ckpt.data-*`), read without TensorFlow (see `gptcli.formats.tfbundle`). Read only.

A source is the release directory, a checkpoint prefix (`models/124M/model.ckpt`) or its `.index` file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gptcli.config import GPTConfig, model_shapes
from gptcli.errors import GptcliError
from gptcli.formats.gpt2 import conv_to_linear, gpt2_block_names, gpt2_config, int_field, read_json, source_shape
from gptcli.formats.plan import ConversionPlan, Description, ReadOptions, TensorPlan, check_shape
from gptcli.formats.tfbundle import TF_DTYPES, TensorBundle

NAME = "openai"
HPARAMS = "hparams.json"


def detect(path: Path) -> bool:
    """A checkpoint prefix or `.index` file, or a directory holding hparams.json and a `*.index`."""
    if path.suffix == ".index" or Path(f"{path}.index").is_file():
        return True
    return path.is_dir() and (path / HPARAMS).is_file() and any(path.glob("*.index"))


def openai_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """gptcli name -> (TensorFlow variable name, is a Conv1D weight to transpose)."""
    names = {"tok_emb.weight": ("model/wte", False), "pos_emb.weight": ("model/wpe", False)}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in gpt2_block_names(i).items():
            names[ours] = (f"model/h{i}/{theirs}", transpose)
    names["final_norm.weight"] = ("model/ln_f/g", False)
    names["final_norm.bias"] = ("model/ln_f/b", False)
    return names


def checkpoint_prefix(directory: Path) -> Path:
    """The checkpoint prefix named by the `checkpoint` file, else the only `*.index` in the dir."""
    state = directory / "checkpoint"
    if state.is_file():
        text = state.read_text(encoding="utf-8", errors="replace")
        match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
        if match:
            prefix = Path(match.group(1))
            return prefix if prefix.is_absolute() else directory / prefix
    indexes = sorted(directory.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise GptcliError(f"no TensorFlow checkpoint (*.index) in {directory}")
    raise GptcliError(f"several checkpoints in {directory}; name one: {directory / indexes[0].stem}")


def _locate(source: Path) -> tuple[Path, Path]:
    """(the directory holding hparams.json, the checkpoint prefix) of a source."""
    if source.is_dir():
        return source, checkpoint_prefix(source)
    return source.parent, source.with_suffix("") if source.suffix == ".index" else source


def _read_config(hparams_path: Path) -> GPTConfig:
    hparams = read_json(hparams_path)
    return gpt2_config(
        int_field(hparams, ("n_vocab",), hparams_path),
        int_field(hparams, ("n_ctx",), hparams_path),
        int_field(hparams, ("n_embd",), hparams_path),
        int_field(hparams, ("n_head",), hparams_path),
        int_field(hparams, ("n_layer",), hparams_path),
        hparams_path,
    )


def _read(source: Path, verify_checksums: bool) -> tuple[ConversionPlan, TensorBundle]:
    """The plan, every variable's presence, dtype, shape and extent checked, and the bundle it reads."""
    directory, prefix = _locate(source)
    config = _read_config(directory / HPARAMS)
    bundle = TensorBundle(prefix, verify_checksums=verify_checksums)
    shapes = model_shapes(config)
    tensors: list[TensorPlan] = []
    for ours, (theirs, transpose) in openai_names(config).items():
        entry = bundle.check(theirs)
        check_shape(entry.shape, source_shape(shapes[ours], transpose), theirs, str(bundle.index_path))

        def load(theirs: str = theirs, transpose: bool = transpose) -> np.ndarray:
            array = bundle.read(theirs)
            return conv_to_linear(array, theirs, str(prefix)) if transpose else array

        tensors.append(TensorPlan(ours, shapes[ours], load))
    return ConversionPlan(config, tensors, str(source), NAME), bundle


def read_plan(source: Path, options: ReadOptions) -> ConversionPlan:
    """A plan reading OpenAI's GPT-2 release directory (or a checkpoint prefix / .index file)."""
    return _read(source, options.verify_checksums)[0]


def describe(source: Path, options: ReadOptions) -> Description:
    plan, bundle = _read(source, options.verify_checksums)
    files = [bundle.index_path] + [bundle.shard_path(i) for i in range(bundle.num_shards)]
    dtypes = sorted({TF_DTYPES.get(e.dtype, (str(e.dtype), ""))[0] for e in bundle.entries.values()})
    origin = {"source": "OpenAI's GPT-2 release (TensorFlow checkpoint)"}
    return Description(plan.config, [f for f in files if f.is_file()], dtypes, origin)
