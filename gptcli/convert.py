"""Convert GPT-2 weights between OpenAI's TensorFlow checkpoints, Hugging Face and gptcli.

OpenAI's release is a TensorFlow "tensor bundle": `model.ckpt.index` is a LevelDB-format table
(sorted keys -> BundleEntryProto records saying where each tensor lies) and
`model.ckpt.data-00000-of-00001` holds the raw little-endian tensors. Both are parsed here by hand,
so no TensorFlow is needed.

Every source is first turned into a plan: gptcli's tensor names and shapes, each with a loader that
reads just that tensor. The plan is validated completely (every variable present, every shape and
offset right) before the output is opened, then written one tensor at a time, so peak memory stays
near the largest tensor rather than the whole model, and a failure leaves no output behind.

The model config of a converted GPT-2 is `qkv_bias=True, tie_weights=True` and `drop_rate=0.1`:
the dropout GPT-2 was trained with (and Hugging Face's default). It only matters when the model is
trained further (`train --init`); `sample` and `eval` run in eval mode, where dropout is off.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.checkpoint import FORMAT, MODEL_FILE, atomic_write, current_umask, model_shapes, read_metadata
from gptcli.choices import SOURCE_FORMATS, TARGET_FORMATS
from gptcli.config import GPTConfig
from gptcli.errors import GptcliError, UsageError
from gptcli.paths import check_can_create
from gptcli.tokenizer import EOT_ID

GPT2_DROP_RATE = 0.1

# --------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as LevelDB tables and TensorFlow bundles store it (masked).

_CRC32C_POLY = 0x82F63B78


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_ZERO_SHIFT_CACHE: dict[int, list[list[int]]] = {}


def _crc_register_py(register: int, data: bytes | memoryview) -> int:
    table = _TABLE_LIST
    for byte in bytes(data):
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _zero_shift_tables(length: int) -> list[list[int]]:
    """Tables for the linear map "feed `length` zero bytes into the CRC register", one per byte.

    The table-driven CRC update is linear over GF(2) in (register, data), so the register after a
    chunk equals shift(register before) XOR (register after the chunk when started from zero).
    """
    if length not in _ZERO_SHIFT_CACHE:
        states = np.array([b << (8 * j) for j in range(4) for b in range(256)], dtype=np.uint32)
        for _ in range(length):
            states = _TABLE[states & 0xFF] ^ (states >> 8)
        flat = [int(v) for v in states]
        _ZERO_SHIFT_CACHE[length] = [flat[256 * j : 256 * (j + 1)] for j in range(4)]
    return _ZERO_SHIFT_CACHE[length]


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C of `data`. Large inputs are split into lanes that numpy advances in parallel and the
    lane results are chained together, which keeps this fast enough for a 500 MB checkpoint."""
    view = data.data if isinstance(data, np.ndarray) else memoryview(data)  # .data: the array's buffer
    buf = np.frombuffer(view.cast("B"), dtype=np.uint8)
    n = buf.size
    register = 0xFFFFFFFF
    lanes = min(1 << 16, n // 256)
    if lanes < 64:
        return _crc_register_py(register, buf.tobytes()) ^ 0xFFFFFFFF
    length = n // lanes
    body = buf[: lanes * length].reshape(lanes, length)
    regs = np.zeros(lanes, dtype=np.uint32)
    step = 256  # columns per transposed block: contiguous rows for numpy, bounded extra memory
    for start in range(0, length, step):
        block = np.ascontiguousarray(body[:, start : start + step].T)
        for column in block:
            regs = _TABLE[(regs ^ column) & 0xFF] ^ (regs >> 8)
    t0, t1, t2, t3 = _zero_shift_tables(length)
    for lane_register in regs.tolist():
        register = (
            t0[register & 0xFF]
            ^ t1[(register >> 8) & 0xFF]
            ^ t2[(register >> 16) & 0xFF]
            ^ t3[register >> 24]
            ^ lane_register
        )
    register = _crc_register_py(register, buf[lanes * length :].tobytes())
    return register ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """LevelDB/TensorFlow store CRCs "masked" so that CRCs of data holding CRCs stay well-mixed."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Protobuf wire format (just what BundleEntryProto and BundleHeaderProto need).


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GptcliError(f"{where}: malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes, where: str) -> dict[int, list[Any]]:
    """Field number -> values (ints for varint/fixed fields, bytes for length-delimited ones)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise GptcliError(f"{where}: truncated protobuf field {number}")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            if pos + size > len(buf):
                raise GptcliError(f"{where}: truncated protobuf field {number}")
            value = buf[pos : pos + size]
            pos += size
        elif wire == 5:
            if pos + 4 > len(buf):
                raise GptcliError(f"{where}: truncated protobuf field {number}")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise GptcliError(f"{where}: unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


# --------------------------------------------------------------------------------------------
# LevelDB table (the `.index` file).

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two padded block handles (40 bytes) and the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte and masked CRC-32C


def _read_block(data: bytes, handle: bytes, where: str) -> bytes:
    offset, pos = _varint(handle, 0, where)
    size, _ = _varint(handle, pos, where)
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(data):
        raise GptcliError(f"{where}: block at offset {offset} (size {size}) runs past the end of the file")
    block = data[offset : offset + size]
    kind = data[offset + size]
    (stored_crc,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset : offset + size + 1]) != unmask_crc(stored_crc):
        raise GptcliError(f"{where}: checksum mismatch in the block at offset {offset} (file corrupt)")
    if kind != 0:
        raise GptcliError(f"{where}: compressed table blocks (type {kind}) are not supported")
    return block


def _block_entries(block: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    """Key/value pairs of one block. Keys are prefix-compressed against the previous key; the
    block ends with restart offsets (uint32 each) and their count, which we only bounds-check."""
    if len(block) < 4:
        raise GptcliError(f"{where}: block too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise GptcliError(f"{where}: bad restart count {num_restarts}")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise GptcliError(f"{where}: malformed block entry at offset {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All key/value pairs of a LevelDB-format table file, in key order."""
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GptcliError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) < FOOTER_SIZE:
        raise GptcliError(f"{where}: too short ({len(data)} bytes) to be a TensorFlow checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != TABLE_MAGIC:
        raise GptcliError(f"{where}: not a TensorFlow checkpoint index (wrong magic number)")
    footer = data[len(data) - FOOTER_SIZE :]
    _, pos = _varint(footer, 0, where)  # metaindex handle: offset, size (unused)
    _, pos = _varint(footer, pos, where)
    index_block = _read_block(data, footer[pos:], where)
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(index_block, where):
        entries.extend(_block_entries(_read_block(data, handle, where), where))
    return entries


# --------------------------------------------------------------------------------------------
# TensorFlow tensor bundle.

# TensorFlow DataType enum values -> numpy little-endian dtypes (bfloat16 is read as uint16).
_TF_DTYPES: dict[int, tuple[str, str]] = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    19: ("float16", "<f2"),
    14: ("bfloat16", "<u2"),
}


@dataclass(frozen=True)
class BundleEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None


def _parse_entry(name: str, value: bytes, where: str) -> BundleEntry:
    fields = _proto_fields(value, f"{where}: entry {name!r}")
    shape: list[int] = []
    for shape_proto in fields.get(2, []):
        for dim in _proto_fields(shape_proto, where).get(2, []):
            size = _proto_fields(dim, where).get(1, [0])[-1]
            shape.append(size - (1 << 64) if size >= 1 << 63 else size)
    if 7 in fields:
        raise GptcliError(f"{where}: {name} is a partitioned (sliced) variable, which is not supported")
    crc = fields.get(6, [None])[-1]
    return BundleEntry(
        name=name,
        dtype=fields.get(1, [0])[-1],
        shape=tuple(shape),
        shard_id=fields.get(3, [0])[-1],
        offset=fields.get(4, [0])[-1],
        size=fields.get(5, [0])[-1],
        crc32c=crc,
    )


class TensorBundle:
    """Random access to the tensors of a TensorFlow checkpoint (`<prefix>.index` + data shards)."""

    def __init__(self, prefix: Path, verify_checksums: bool = True) -> None:
        self.prefix = prefix
        self.index_path = Path(f"{prefix}.index")
        self.verify_checksums = verify_checksums
        where = str(self.index_path)
        if not self.index_path.is_file():
            raise GptcliError(f"checkpoint index not found: {self.index_path}")
        table = read_table(self.index_path)
        if not table or table[0][0] != b"":
            raise GptcliError(f"{where}: no bundle header (not a TensorFlow V2 checkpoint)")
        header = _proto_fields(table[0][1], f"{where}: header")
        self.num_shards = header.get(1, [1])[-1]
        self.big_endian = header.get(2, [0])[-1] == 1
        if self.num_shards < 1:
            raise GptcliError(f"{where}: bad shard count {self.num_shards}")
        self.entries: dict[str, BundleEntry] = {}
        for key, value in table[1:]:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise GptcliError(f"{where}: tensor name is not UTF-8") from None
            self.entries[name] = _parse_entry(name, value, where)
        self.shard_sizes: dict[int, int] = {}

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def check(self, name: str) -> BundleEntry:
        """The entry of `name`, with its dtype, size and offset checked against the data shard."""
        entry = self.entries.get(name)
        if entry is None:
            raise GptcliError(f"{self.index_path}: variable {name} is missing")
        if entry.dtype not in _TF_DTYPES:
            raise GptcliError(f"{self.index_path}: {name} has unsupported dtype (TensorFlow enum {entry.dtype})")
        itemsize = np.dtype(_TF_DTYPES[entry.dtype][1]).itemsize
        if any(d < 0 for d in entry.shape) or math.prod(entry.shape) * itemsize != entry.size:
            raise GptcliError(f"{self.index_path}: {name} claims {entry.size} bytes for shape {list(entry.shape)}")
        if not 0 <= entry.shard_id < self.num_shards:
            raise GptcliError(f"{self.index_path}: {name} refers to shard {entry.shard_id} of {self.num_shards}")
        if entry.shard_id not in self.shard_sizes:
            path = self.shard_path(entry.shard_id)
            if not path.is_file():
                raise GptcliError(f"checkpoint data file not found: {path}")
            self.shard_sizes[entry.shard_id] = path.stat().st_size
        shard_size = self.shard_sizes[entry.shard_id]
        if entry.offset + entry.size > shard_size:
            raise GptcliError(
                f"{self.shard_path(entry.shard_id)}: {name} at bytes "
                f"{entry.offset}..{entry.offset + entry.size} "
                f"lies past the end of the file ({shard_size} bytes; truncated or wrong data file)"
            )
        return entry

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32, read with a seek so that only it is in memory."""
        entry = self.check(name)
        path = self.shard_path(entry.shard_id)
        kind, code = _TF_DTYPES[entry.dtype]
        with open(path, "rb") as handle:
            handle.seek(entry.offset)
            raw = np.fromfile(handle, dtype=np.uint8, count=entry.size)
        if raw.size != entry.size:
            raise GptcliError(f"{path}: {name} is truncated")
        if self.verify_checksums and entry.crc32c is not None and crc32c(raw) != unmask_crc(entry.crc32c):
            raise GptcliError(f"{path}: checksum mismatch for {name} (data file corrupt)")
        dtype = np.dtype(code).newbyteorder(">") if self.big_endian else np.dtype(code)
        array = raw.view(dtype).reshape(entry.shape)
        if kind == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        # No copy for native float32: peak memory stays at one copy of the largest tensor.
        return array.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Conversion plans.


@dataclass
class TensorPlan:
    """One output tensor: its name, shape and how to read it (as float32)."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass
class Plan:
    config: GPTConfig
    tensors: list[TensorPlan]
    source: str
    source_format: str
    extra: dict[str, str] = field(default_factory=dict)  # metadata for the gptcli output
    notes: list[str] = field(default_factory=list)  # what the user should know about the conversion

    @property
    def num_bytes(self) -> int:
        return sum(4 * math.prod(t.shape) for t in self.tensors)


def _gpt2_block_names(i: int) -> dict[str, tuple[str, bool]]:
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


def _openai_to_gptcli_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    names = {"tok_emb.weight": ("model/wte", False), "pos_emb.weight": ("model/wpe", False)}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in _gpt2_block_names(i).items():
            names[ours] = (f"model/h{i}/{theirs}", transpose)
    names["final_norm.weight"] = ("model/ln_f/g", False)
    names["final_norm.bias"] = ("model/ln_f/b", False)
    return names


def hf_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """gptcli name -> (Hugging Face GPT-2 name without the `transformer.` prefix, transpose): the one
    mapping between the two layouts (transpose: HF keeps Conv1D weights as (in, out))."""
    names = {"tok_emb.weight": ("wte.weight", False), "pos_emb.weight": ("wpe.weight", False)}
    for i in range(config.n_layers):
        for ours, (theirs, transpose) in _gpt2_block_names(i).items():
            module, _, param = theirs.rpartition("/")
            hf = module.replace("/", ".") + (".bias" if param == "b" else ".weight")
            names[ours] = (f"h.{i}.{hf}", transpose)
    names["final_norm.weight"] = ("ln_f.weight", False)
    names["final_norm.bias"] = ("ln_f.bias", False)
    if not config.tie_weights:
        names["out_head.weight"] = ("lm_head.weight", False)
    return names


def _conv_to_linear(array: np.ndarray, name: str, where: str) -> np.ndarray:
    """GPT-2's Conv1D weights are (in, out), OpenAI's with a leading 1; torch Linear wants (out, in)."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise GptcliError(f"{where}: {name} has shape {list(array.shape)}, expected a 2-D weight")
    return np.ascontiguousarray(array.T)


def _source_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return (shape[1], shape[0]) if transpose else shape


def _check_shape(actual: tuple[int, ...], expected: tuple[int, ...], name: str, where: str) -> None:
    squeezed = actual[1:] if len(actual) == 3 and actual[0] == 1 and len(expected) == 2 else actual
    if tuple(squeezed) != tuple(expected):
        raise GptcliError(
            f"{where}: {name} has shape {list(actual)}, expected {list(expected)} (from the model config)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptcliError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GptcliError(f"{path} is not a JSON object")
    return data


def _int_field(data: dict[str, Any], keys: tuple[str, ...], path: Path) -> int:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise GptcliError(f"{path}: {key} must be positive, got {value}")
            return value
    raise GptcliError(f"{path}: missing integer field {keys[0]}")


def _gpt2_config(vocab: int, ctx: int, emb: int, heads: int, layers: int, where: Path, **kw: Any) -> GPTConfig:
    try:
        return GPTConfig(
            vocab_size=vocab,
            context_length=ctx,
            emb_dim=emb,
            n_heads=heads,
            n_layers=layers,
            qkv_bias=True,
            tie_weights=kw.get("tie_weights", True),
            drop_rate=kw.get("drop_rate", GPT2_DROP_RATE),
        )
    except GptcliError as exc:
        raise GptcliError(f"{where}: {exc.message}") from None


def _checkpoint_prefix(directory: Path) -> Path:
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


def openai_plan(source: Path, verify_checksums: bool = True) -> Plan:
    """A plan reading OpenAI's GPT-2 release directory (or a checkpoint prefix / .index file)."""
    if source.is_dir():
        directory, prefix = source, _checkpoint_prefix(source)
    else:
        directory = source.parent
        prefix = source.with_suffix("") if source.suffix == ".index" else source
    hparams_path = directory / "hparams.json"
    hparams = _read_json(hparams_path)
    config = _gpt2_config(
        _int_field(hparams, ("n_vocab",), hparams_path),
        _int_field(hparams, ("n_ctx",), hparams_path),
        _int_field(hparams, ("n_embd",), hparams_path),
        _int_field(hparams, ("n_head",), hparams_path),
        _int_field(hparams, ("n_layer",), hparams_path),
        hparams_path,
    )
    bundle = TensorBundle(prefix, verify_checksums=verify_checksums)
    shapes = model_shapes(config)
    tensors: list[TensorPlan] = []
    for ours, (theirs, transpose) in _openai_to_gptcli_names(config).items():
        entry = bundle.check(theirs)
        _check_shape(entry.shape, _source_shape(shapes[ours], transpose), theirs, str(bundle.index_path))

        def load(theirs: str = theirs, transpose: bool = transpose) -> np.ndarray:
            array = bundle.read(theirs)
            return _conv_to_linear(array, theirs, str(prefix)) if transpose else array

        tensors.append(TensorPlan(ours, shapes[ours], load))
    return Plan(config, tensors, str(source), "openai")


def _hf_files(source: Path) -> tuple[Path, dict[str, Path]]:
    """config.json and a map tensor name -> safetensors file (single file or sharded index)."""
    directory = source if source.is_dir() else source.parent
    config_path = directory / "config.json"
    single = source if source.is_file() else directory / "model.safetensors"
    sharded = directory / "model.safetensors.index.json"
    if single.is_file():
        return config_path, {name: single for name in _safetensors_names(single)}
    if sharded.is_file():
        weight_map = _read_json(sharded).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GptcliError(f"{sharded} has no weight_map")
        return config_path, {name: directory / str(file) for name, file in weight_map.items()}
    if (directory / "pytorch_model.bin").is_file():
        raise GptcliError(
            f"{directory} holds only pytorch_model.bin (a pickle, which gptcli does not load); "
            "save the model with safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise GptcliError(f"no model.safetensors in {directory}")


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise GptcliError(f"{path} is not a readable safetensors file ({exc})") from None


def _safetensors_loader(path: Path, name: str) -> Callable[[], np.ndarray]:
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


def _safetensors_shape(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def hf_plan(source: Path) -> Plan:
    """A plan reading a Hugging Face GPT-2 checkpoint (`config.json` + `model.safetensors`)."""
    config_path, files = _hf_files(source)
    hf = _read_json(config_path)
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GptcliError(f"{config_path}: model_type is {model_type!r}; only GPT-2 ('gpt2') is supported")
    emb = _int_field(hf, ("n_embd", "hidden_size"), config_path)
    # What gptcli's architecture fixes; refuse the variants it cannot represent exactly.
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
    drop = hf.get("resid_pdrop", GPT2_DROP_RATE)
    config = _gpt2_config(
        _int_field(hf, ("vocab_size",), config_path),
        _int_field(hf, ("n_positions", "n_ctx"), config_path),
        emb,
        _int_field(hf, ("n_head", "num_attention_heads"), config_path),
        _int_field(hf, ("n_layer", "num_hidden_layers"), config_path),
        config_path,
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
        drop_rate=float(drop) if isinstance(drop, (int, float)) else GPT2_DROP_RATE,
    )
    # Hub checkpoints name tensors with or without the `transformer.` prefix.
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
        _check_shape(_safetensors_shape(path, stored), _source_shape(shapes[ours], transpose), stored, str(path))
        loader = _safetensors_loader(path, stored)

        def load(loader: Callable[[], np.ndarray] = loader, transpose: bool = transpose, n: str = stored) -> np.ndarray:
            array = loader()
            return _conv_to_linear(array, n, str(source)) if transpose else array

        tensors.append(TensorPlan(ours, shapes[ours], load))
    return Plan(config, tensors, str(source), "hf")


def gptcli_plan(source: Path) -> Plan:
    """A plan reading a gptcli model file (or a run directory holding model.safetensors)."""
    from gptcli.checkpoint import load_config, resolve_model_path

    path = resolve_model_path(source)
    config = load_config(path)
    names = _safetensors_names(path)
    shapes = model_shapes(config)
    tensors = []
    for name, shape in shapes.items():
        if name not in names:
            raise GptcliError(f"{path}: tensor {name} is missing")
        _check_shape(_safetensors_shape(path, name), shape, name, str(path))
        tensors.append(TensorPlan(name, shape, _safetensors_loader(path, name)))
    return Plan(config, tensors, str(path), "gptcli")


def detect_format(source: Path) -> str:
    """openai, hf or gptcli, from the files present."""
    if source.suffix == ".index" or Path(f"{source}.index").is_file():
        return "openai"
    if not source.exists():
        raise GptcliError(f"not found: {source}")
    if source.is_file():
        if source.suffix in (".pth", ".pt"):
            return "book"
        if source.suffix != ".safetensors":
            raise UsageError(f"cannot tell the format of {source}; pass --from openai|hf|gptcli|book")
        from gptcli.formats.book import is_book_safetensors

        if read_metadata(source).get("format") == FORMAT:
            return "gptcli"
        return "book" if is_book_safetensors(source) else "hf"
    if (source / "hparams.json").is_file() and any(source.glob("*.index")):
        return "openai"
    if (source / "config.json").is_file():
        return "hf"
    if (source / MODEL_FILE).is_file():
        return "gptcli"
    if (source / "hparams.json").is_file():
        raise GptcliError(f"{source} has hparams.json but no checkpoint index (*.index); is the download complete?")
    raise GptcliError(
        f"{source} holds no known model: expected OpenAI's hparams.json + model.ckpt.*, "
        "Hugging Face's config.json + model.safetensors, or a gptcli model.safetensors"
    )


def make_plan(
    source: str | Path, source_format: str = "auto", verify_checksums: bool = True, n_heads: int | None = None
) -> Plan:
    source = Path(source)
    if source_format not in SOURCE_FORMATS:
        raise UsageError(f"unknown source format {source_format!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    if source_format == "auto":
        source_format = detect_format(source)
    elif not source.exists() and not Path(f"{source}.index").exists():
        raise GptcliError(f"not found: {source}")
    if source_format == "openai":
        return openai_plan(source, verify_checksums)
    if source_format == "hf":
        return hf_plan(source)
    if source_format == "book":
        from gptcli.formats.book import book_plan

        return book_plan(source, n_heads)
    return gptcli_plan(source)


# --------------------------------------------------------------------------------------------
# Writers.

ProgressCallback = Callable[[int, int, str], None]  # (tensors done, tensors in all, name)


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


def write_gptcli(plan: Plan, out: str | Path, on_tensor: ProgressCallback | None = None) -> Path:
    """Write `plan` as a gptcli model file (what `gptcli.checkpoint.load_model` reads), atomically."""
    out = Path(out)
    metadata = {**plan.extra, "format": FORMAT, "config": plan.config.to_json(), "converted_from": plan.source_format}
    names = {t.name: t.name for t in plan.tensors}
    atomic_write(out, lambda tmp: write_safetensors_stream(tmp, plan.tensors, metadata, names, on_tensor))
    return out


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


def _hf_tensors(plan: Plan) -> tuple[list[TensorPlan], dict[str, str]]:
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

            tensor = TensorPlan(hf_name, _source_shape(source.shape, transpose), load)
        out.append(tensor)
        names[hf_name] = hf_name
    return out, names


def write_hf(plan: Plan, out_dir: str | Path, on_tensor: ProgressCallback | None = None) -> Path:
    """Write `plan` as a Hugging Face GPT-2 directory (config.json + model.safetensors).

    A new directory is assembled beside its final place and renamed there, so a failure leaves
    nothing; into an existing directory the two files are replaced one by one, each atomically.
    """
    out_dir = Path(out_dir)
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
        target = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        os.chmod(target, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the directory normal permissions
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
    if target_format not in TARGET_FORMATS:
        raise UsageError(f"unknown target format {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    from gptcli.choices import GGUF_TYPES

    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if target_format == "hf" and not force:
        _check_empty_dir(Path(out) if out is not None else default_output(Path(source), "", "hf"))
    plan = make_plan(source, source_format, verify_checksums, n_heads)
    if n_heads is not None and plan.source_format != "book":
        raise UsageError(f"--n-heads applies to the book's files only; {plan.source_format} files say their heads")
    output = Path(out) if out is not None else default_output(Path(source), plan.source_format, target_format)
    if target_format == "gptcli" and output.is_dir():
        output = output / MODEL_FILE
    if _same_file(output, Path(source)) or _same_file(output, Path(plan.source)):
        raise UsageError(f"refusing to overwrite the source {plan.source} with its conversion; pass --out")
    check_can_create(output)
    try:
        if target_format == "hf":
            write_hf(plan, output, on_tensor)
        elif target_format == "book":
            from gptcli.formats.book import write_book

            write_book(plan, output, on_tensor)
        elif target_format == "gguf":
            from gptcli.formats.gguf import write_gguf

            write_gguf(plan, output, gguf_type, on_tensor=on_tensor)
        else:
            write_gptcli(plan, output, on_tensor)
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
