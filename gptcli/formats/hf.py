"""Hugging Face's GPT-2: a directory with `config.json` and `model.safetensors` (or shards named in
`model.safetensors.index.json`), read and written. Hugging Face keeps GPT-2's Conv1D weights as
(in, out), so those are transposed both ways; its tensors are named with or without `transformer.`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.config import GPTConfig, model_shapes
from gptcli.durable import atomic_write, temp_path
from gptcli.errors import GptcliError, UsageError
from gptcli.formats.gpt2 import (
    GPT2_DROP_RATE,
    conv_to_linear,
    gpt2_block_names,
    gpt2_config,
    int_field,
    read_json,
    source_shape,
)
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
from gptcli.tokenizer import EOT_ID

NAME = "hf"
CONFIG_FILE = "config.json"


def detect(path: Path) -> bool:
    """A directory holding config.json; or any `.safetensors` file, so the registry asks the formats
    whose safetensors files it can recognise (gptcli's, the book's) before this one."""
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    return path.is_file() and path.suffix == ".safetensors"


def hf_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """gptcli name -> (Hugging Face GPT-2 name without the `transformer.` prefix, transpose): the one
    mapping between the two layouts (transpose: HF keeps Conv1D weights as (in, out))."""
    names = {"tok_emb.weight": ("wte.weight", False), "pos_emb.weight": ("wpe.weight", False)}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in gpt2_block_names(i).items():
            module, _, param = theirs.rpartition("/")
            hf = module.replace("/", ".") + (".bias" if param == "b" else ".weight")
            names[ours] = (f"h.{i}.{hf}", transpose)
    names["final_norm.weight"] = ("ln_f.weight", False)
    names["final_norm.bias"] = ("ln_f.bias", False)
    if not config.tie_weights:
        names["out_head.weight"] = ("lm_head.weight", False)
    return names


# --------------------------------------------------------------------------------------------
# Reading.


def hf_files(source: Path) -> tuple[Path, dict[str, Path]]:
    """config.json and a map tensor name -> safetensors file (single file or sharded index)."""
    directory = source if source.is_dir() else source.parent
    config_path = directory / CONFIG_FILE
    single = source if source.is_file() else directory / "model.safetensors"
    sharded = directory / "model.safetensors.index.json"
    if single.is_file():
        return config_path, {name: single for name in safetensors_names(single)}
    if sharded.is_file():
        weight_map = read_json(sharded).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GptcliError(f"{sharded} has no weight_map")
        return config_path, {name: directory / str(file) for name, file in weight_map.items()}
    if (directory / "pytorch_model.bin").is_file():
        raise GptcliError(
            f"{directory} holds only pytorch_model.bin (a pickle, which gptcli does not load); "
            "save the model with safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise GptcliError(f"no model.safetensors in {directory}")


def _check_architecture(hf: dict[str, Any], emb: int, config_path: Path) -> None:
    """Refuse the GPT-2 variants that gptcli's architecture (which fixes these) cannot represent exactly."""
    checks = [
        (
            hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
            "activation_function",
        ),
        (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "layer_norm_epsilon"),
        (hf.get("n_inner") in (None, 4 * emb), "n_inner"),
        (hf.get("scale_attn_weights", True) is True, "scale_attn_weights"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        (not hf.get("add_cross_attention", False), "add_cross_attention"),
    ]
    for ok, key in checks:
        if not ok:
            raise GptcliError(f"{config_path}: {key}={hf.get(key)!r} is not supported by gptcli's GPT")


def _read_config(config_path: Path) -> tuple[GPTConfig, dict[str, Any]]:
    """gptcli's config from config.json, and config.json itself."""
    hf = read_json(config_path)
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GptcliError(f"{config_path}: model_type is {model_type!r}; only GPT-2 ('gpt2') is supported")
    emb = int_field(hf, ("n_embd", "hidden_size"), config_path)
    _check_architecture(hf, emb, config_path)
    drop = hf.get("resid_pdrop", GPT2_DROP_RATE)
    config = gpt2_config(
        int_field(hf, ("vocab_size",), config_path),
        int_field(hf, ("n_positions", "n_ctx"), config_path),
        emb,
        int_field(hf, ("n_head", "num_attention_heads"), config_path),
        int_field(hf, ("n_layer", "num_hidden_layers"), config_path),
        config_path,
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
        drop_rate=float(drop) if isinstance(drop, (int, float)) else GPT2_DROP_RATE,
    )
    return config, hf


def _tensor_plans(source: Path, config: GPTConfig, files: dict[str, Path]) -> list[TensorPlan]:
    """Every tensor of `config`, found (with or without `transformer.`) and shape-checked in `files`."""
    lookup = {name.removeprefix("transformer."): name for name in files}
    shapes = model_shapes(config)
    tensors: list[TensorPlan] = []
    for ours, (theirs, transpose) in hf_names(config).items():
        stored = lookup.get(theirs)
        if stored is None:
            raise GptcliError(f"{source}: tensor {theirs} is missing")
        path = files[stored]
        if not path.is_file():
            raise GptcliError(f"{path} not found (named in the shard index)")
        check_shape(safetensors_shape(path, stored), source_shape(shapes[ours], transpose), stored, str(path))
        loader = safetensors_loader(path, stored)

        def load(loader: Callable[[], np.ndarray] = loader, transpose: bool = transpose, n: str = stored) -> np.ndarray:
            array = loader()
            return conv_to_linear(array, n, str(source)) if transpose else array

        tensors.append(TensorPlan(ours, shapes[ours], load))
    return tensors


def read_plan(source: Path, options: ReadOptions) -> ConversionPlan:
    """A plan reading a Hugging Face GPT-2 checkpoint (`config.json` + `model.safetensors`)."""
    config_path, files = hf_files(source)
    config, _ = _read_config(config_path)
    return ConversionPlan(config, _tensor_plans(source, config, files), str(source), NAME)


def describe(source: Path, options: ReadOptions) -> Description:
    config_path, weights = hf_files(source)
    config, hf = _read_config(config_path)
    _tensor_plans(source, config, weights)  # checked as `convert` would check them
    files = sorted(set(weights.values()))
    origin = {"source": "Hugging Face", "architectures": hf.get("architectures"), "model_type": hf.get("model_type")}
    return Description(config, [config_path, *files], safetensors_dtypes(files), origin)


# --------------------------------------------------------------------------------------------
# Writing.


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """A Hugging Face GPT2Config for gptcli's architecture (tanh GELU, LayerNorm eps 1e-5)."""
    data: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_head": config.n_heads,
        "n_layer": config.n_layers,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": config.tie_weights,
        "torch_dtype": "float32",
    }
    if config.vocab_size > EOT_ID:  # GPT-2's <|endoftext|>
        data["bos_token_id"] = data["eos_token_id"] = EOT_ID
    return data


def _hf_tensors(plan: ConversionPlan) -> tuple[list[TensorPlan], dict[str, str]]:
    """The plan re-expressed in Hugging Face's layout: Conv1D weights (in, out), qkv bias always."""
    config = plan.config
    by_name = {t.name: t for t in plan.tensors}
    out: list[TensorPlan] = []
    names: dict[str, str] = {}
    for ours, (theirs, transpose) in hf_names(config).items():
        hf_name = theirs if theirs == "lm_head.weight" else f"transformer.{theirs}"
        if ours not in by_name:
            # A model without qkv bias is exactly a GPT-2 whose c_attn bias is zero.
            size = 3 * config.emb_dim
            tensor = TensorPlan(hf_name, (size,), partial(np.zeros, size, dtype=np.float32))
        else:
            source = by_name[ours]

            def load(source: TensorPlan = source, transpose: bool = transpose) -> np.ndarray:
                array = source.load()
                return np.ascontiguousarray(array.T) if transpose else array

            tensor = TensorPlan(hf_name, source_shape(source.shape, transpose), load)
        out.append(tensor)
        names[hf_name] = hf_name
    return out, names


def write(
    plan: ConversionPlan, out_dir: Path, options: WriteOptions, on_tensor: ProgressCallback | None = None
) -> Path:
    """Write `plan` as a Hugging Face GPT-2 directory (config.json + model.safetensors).

    A new directory is assembled beside its final place and renamed there, so a failure leaves
    nothing; into an existing directory the two files are replaced one by one, each atomically.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory (--to hf writes a directory)")
    tensors, names = _hf_tensors(plan)
    config_text = json.dumps(hf_config(plan.config), indent=2) + "\n"
    # transformers refuses safetensors files without format=pt in their metadata.
    metadata = {"format": "pt"}
    fresh = not out_dir.exists() or not any(out_dir.iterdir())
    target = out_dir
    if fresh:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        target = temp_path(out_dir)
        target.mkdir()  # the umask applies
    try:
        atomic_write(
            target / "model.safetensors",
            lambda tmp: write_safetensors_stream(tmp, tensors, metadata, names, on_tensor),
        )
        atomic_write(target / "config.json", lambda tmp: tmp.write_text(config_text, encoding="utf-8"))
        if fresh:
            if out_dir.exists():
                out_dir.rmdir()
            os.replace(target, out_dir)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out_dir

