"""llama.cpp's GGUF: a gptcli model as llama.cpp's `gpt2` architecture, with GPT-2's tokenizer.

Written with the `gguf` package (the format's own reader/writer, maintained with llama.cpp). The
layout is what llama.cpp's gpt2 loader expects (its `convert_hf_to_gguf.py` writes the same):
one fused `blk.N.attn_qkv` projection (q, k, v stacked, as gptcli's `att.qkv`), every weight as
torch's Linear (out, in) matrix (GGUF lists dimensions innermost first, so it reads as (in, out)),
`token_embd`/`position_embd`, LayerNorm weight and bias for `attn_norm`/`ffn_norm`/`output_norm`,
`ffn_up`/`ffn_down`, and an untied head as `output.weight`. A tied head is omitted: llama.cpp's
gpt2 loader then uses `token_embd.weight`. llama.cpp requires the qkv bias; a model without one
gets zeros, which computes the same function.

`--gguf-type`: f32; f16 or q8_0 (the package's quantizer, blocks of 32) for the 2-D matrices, with
1-D tensors (norms, biases) kept in f32 as llama.cpp's converter does. A matrix whose rows do not
split into blocks of 32 falls back to f16.

The tokenizer is GPT-2's byte-level BPE from `encoder.json` and `vocab.bpe`: tokens, merges, token
types (`<|endoftext|>` is a control token, ids past GPT-2's 50257 are unused padding), and
`<|endoftext|>` as BOS and EOS, with no BOS added to prompts (gptcli adds none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.choices import GGUF_TYPES
from gptcli.config import GPTConfig
from gptcli.durable import atomic_write
from gptcli.errors import GptcliError, UsageError
from gptcli.formats.plan import ConversionPlan, Description, ProgressCallback, ReadOptions, WriteOptions
from gptcli.tokenizer import EOT_ID
from gptcli.tokenizer import bpe_dir as find_bpe_dir

NAME = "gguf"
ARCH = "gpt2"
CONFIG_KEY = "gptcli.config"
SOURCE_KEY = "gptcli.converted_from"
GPT2_VOCAB = 50257
LAYER_NORM_EPS = 1e-5


def gguf_names(config: GPTConfig) -> dict[str, str]:
    """gptcli tensor name -> llama.cpp gpt2 tensor name (qkv bias included even when absent)."""
    names = {
        "tok_emb.weight": "token_embd.weight",
        "pos_emb.weight": "position_embd.weight",
        "final_norm.weight": "output_norm.weight",
        "final_norm.bias": "output_norm.bias",
    }
    parts = {
        "norm1": "attn_norm",
        "att.qkv": "attn_qkv",
        "att.out_proj": "attn_output",
        "norm2": "ffn_norm",
        "ff.fc": "ffn_up",
        "ff.proj": "ffn_down",
    }
    for i in range(config.n_layers):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    if not config.tie_weights:
        names["out_head.weight"] = "output.weight"
    return names


def gpt2_vocab(bpe_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of GPT-2's BPE, padded to `vocab_size` with unused tokens."""
    import gguf

    from gptcli.tokenizer import ENCODER_JSON, VOCAB_BPE

    if vocab_size < GPT2_VOCAB:
        raise UsageError(
            f"GGUF embeds GPT-2's tokenizer ({GPT2_VOCAB} tokens), but the model's vocabulary has {vocab_size}"
        )
    try:
        encoder = json.loads((bpe_dir / ENCODER_JSON).read_text(encoding="utf-8"))
        merges_text = (bpe_dir / VOCAB_BPE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"cannot read GPT-2's BPE files in {bpe_dir}: {exc}") from None
    by_id = {int(i): token for token, i in encoder.items()}
    if sorted(by_id) != list(range(GPT2_VOCAB)):
        raise GptcliError(f"{bpe_dir / ENCODER_JSON} does not hold GPT-2's {GPT2_VOCAB} tokens")
    tokens = [by_id[i] for i in range(GPT2_VOCAB)] + [f"[PAD{i}]" for i in range(GPT2_VOCAB, vocab_size)]
    types = [int(gguf.TokenType.NORMAL)] * GPT2_VOCAB + [int(gguf.TokenType.UNUSED)] * (vocab_size - GPT2_VOCAB)
    types[EOT_ID] = int(gguf.TokenType.CONTROL)
    merges = [line for line in merges_text.splitlines() if line and not line.startswith("#version")]
    return tokens, types, merges


def _tensor_type(gguf_type: str, array_shape: tuple[int, ...]) -> Any:
    import gguf

    Q = gguf.GGMLQuantizationType
    if gguf_type == "f32" or len(array_shape) < 2:
        return Q.F32
    if gguf_type == "q8_0" and array_shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


# --gguf-type -> general.file_type, llama.cpp's LlamaFileType (ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def _add_metadata(writer: Any, plan: ConversionPlan, gguf_type: str, name: str, bpe_dir: Path) -> None:
    import gguf

    config = plan.config
    writer.add_name(name)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_feed_forward_length(4 * config.emb_dim)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gpt2_vocab(bpe_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)
    writer.add_string(CONFIG_KEY, config.to_json())
    writer.add_string(SOURCE_KEY, plan.source_format)


def _gguf_tensors(plan: ConversionPlan) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(llama.cpp name, shape, loader) for every tensor, a zero qkv bias added when the model has none."""
    by_name = {t.name: t for t in plan.tensors}
    out: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = []
    for ours, theirs in gguf_names(plan.config).items():
        if ours in by_name:
            out.append((theirs, tuple(by_name[ours].shape), by_name[ours].load))
        else:
            size = 3 * plan.config.emb_dim
            out.append((theirs, (size,), partial(np.zeros, size, dtype=np.float32)))
    return out


def write(plan: ConversionPlan, out: Path, options: WriteOptions, on_tensor: ProgressCallback | None = None) -> Path:
    """Write `plan` as a GGUF file for llama.cpp, atomically, one tensor in memory at a time."""
    import gguf

    gguf_type = options.gguf_type
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"unknown --gguf-type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    directory = find_bpe_dir(options.gguf_bpe_dir)
    gpt2_vocab(directory, plan.config.vocab_size)  # fail on the tokenizer before any work
    tensors = _gguf_tensors(plan)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _add_metadata(writer, plan, gguf_type, out.stem, directory)
            types = [_tensor_type(gguf_type, shape) for _, shape, _ in tensors]
            for (name, shape, _), qtype in zip(tensors, types, strict=True):
                nbytes = _encoded_nbytes(shape, qtype)
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, ((name, shape, load), qtype) in enumerate(zip(tensors, types, strict=True)):
                array = load()
                if tuple(array.shape) != shape:
                    raise GptcliError(f"{name}: read shape {list(array.shape)}, expected {list(shape)}")
                writer.write_tensor_data(_encode(array, qtype))
                if on_tensor:
                    on_tensor(done + 1, len(tensors), name)
        finally:
            writer.close()

    atomic_write(out, write)
    return out


def _encoded_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * block_bytes


# --------------------------------------------------------------------------------------------
# Reading (for `gptcli info` and the tests).


def detect(path: Path) -> bool:
    return path.suffix == ".gguf"


def _field_value(field: Any) -> Any:
    """A GGUFReader field as a Python value (strings decoded, arrays as lists)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def read_gguf(path: Path, with_vocab: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """Metadata (as Python values; token arrays skipped unless `with_vocab`) and tensors of a GGUF."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise GptcliError(f"{path} is not a readable GGUF file ({exc})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (key.startswith("tokenizer.ggml.") and not with_vocab and key.endswith(
            ("tokens", "token_type", "merges")
        )):
            continue
        metadata[key] = _field_value(field)
    return metadata, list(reader.tensors)


def gguf_config(path: Path, metadata: dict[str, Any]) -> GPTConfig:
    """The model config of a GGUF written by gptcli (from its gptcli.config key)."""
    text = metadata.get(CONFIG_KEY)
    if metadata.get("general.architecture") != ARCH or not isinstance(text, str):
        raise GptcliError(f"{path}: not a GGUF written by gptcli (no {CONFIG_KEY} metadata)")
    return GPTConfig.from_json(text)


def dequantized(tensor: Any) -> np.ndarray:
    """A GGUFReader tensor as float32 in torch's shape (GGUF lists dimensions innermost first)."""
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def describe(path: Path, options: ReadOptions) -> Description:
    metadata, tensors = read_gguf(path)
    config = gguf_config(path, metadata)
    dtypes = sorted({t.tensor_type.name for t in tensors})
    type_names = {code: name for name, code in FILE_TYPES.items()}
    origin = {
        "converted_from": metadata.get(SOURCE_KEY),
        "name": metadata.get("general.name"),
        "architecture": metadata.get("general.architecture"),
        "gguf_type": type_names.get(metadata.get("general.file_type", -1), "other"),
        "tokenizer": metadata.get("tokenizer.ggml.model"),
    }
    return Description(config, [path], dtypes, origin)
