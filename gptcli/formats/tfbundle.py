"""OpenAI's GPT-2 release format, read by hand so that no TensorFlow is needed: a TensorFlow V2
"tensor bundle". `model.ckpt.index` is a LevelDB-format table (sorted keys -> BundleEntryProto
records saying where each tensor lies), `model.ckpt.data-00000-of-00001` holds the raw little-endian
tensors. Both carry CRC-32C checksums, which `TensorBundle` checks as it reads.

Layers, bottom up: CRC-32C (as LevelDB and TensorFlow store it, masked), the protobuf wire format
(just what BundleEntryProto and BundleHeaderProto need), the LevelDB table, the tensor bundle.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.errors import GptcliError

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
TF_DTYPES: dict[int, tuple[str, str]] = {
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
        if entry.dtype not in TF_DTYPES:
            raise GptcliError(f"{self.index_path}: {name} has unsupported dtype (TensorFlow enum {entry.dtype})")
        itemsize = np.dtype(TF_DTYPES[entry.dtype][1]).itemsize
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
        kind, code = TF_DTYPES[entry.dtype]
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
