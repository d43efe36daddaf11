"""GPT-2's byte-pair encoding through tiktoken, usable offline from local BPE files.

Lookup order: an explicit directory (option or `GPTCLI_BPE_DIR`), then gptcli's cache
(`gptcli fetch tokenizer` puts the canonical copies there), then the copies bundled in the package,
so the tokenizer never needs the network.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gptcli.errors import GptcliError
from gptcli.paths import tokenizer_cache_dir

if TYPE_CHECKING:
    import tiktoken

BPE_DIR_ENV = "GPTCLI_BPE_DIR"
ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
# The sha256 values tiktoken itself checks for GPT-2's files.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256


def bpe_dir(explicit: str | Path | None = None) -> Path:
    """The directory whose encoder.json and vocab.bpe the tokenizer uses (see the module's lookup order)."""
    from gptcli.assets import BPE_DIR

    chosen = explicit or os.environ.get(BPE_DIR_ENV)
    directory = Path(chosen) if chosen else tokenizer_cache_dir()
    if (directory / ENCODER_JSON).is_file() and (directory / VOCAB_BPE).is_file():
        return directory
    if chosen:
        raise GptcliError(
            f"no GPT-2 BPE files ({ENCODER_JSON}, {VOCAB_BPE}) in {directory}; "
            "point GPTCLI_BPE_DIR at a directory holding them, or unset it to use the bundled copies"
        )
    return BPE_DIR


@functools.lru_cache(maxsize=4)
def _load(bpe_dir: str) -> tiktoken.Encoding:
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=_mergeable_ranks(Path(bpe_dir)),
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=50257,
    )


def _mergeable_ranks(directory: Path) -> dict[bytes, int]:
    """GPT-2's ranks, token bytes -> id, from encoder.json once both files' sha256 are GPT-2's: the
    same ranks as tiktoken's `data_gym_to_mergeable_bpe_ranks`, which also re-derives them from every
    merge in vocab.bpe (0.3 s of each start-up, where these checks and one mapping take 0.05 s)."""
    import hashlib
    import json

    blobs = {}
    for name, expected in ((ENCODER_JSON, ENCODER_JSON_SHA256), (VOCAB_BPE, VOCAB_BPE_SHA256)):
        blobs[name] = (directory / name).read_bytes()
        if hashlib.sha256(blobs[name]).hexdigest() != expected:
            raise GptcliError(f"the GPT-2 BPE files in {directory} are corrupt: {name} has another sha256 than GPT-2's")
    to_bytes = _byte_decoder()
    return {token.translate(to_bytes).encode("latin-1"): rank
            for token, rank in json.loads(blobs[ENCODER_JSON]).items() if token != ENDOFTEXT}


def _byte_decoder() -> dict[int, int]:
    """GPT-2's printable stand-ins for bytes, reversed (a `str.translate` table to latin-1): bytes
    that print stand for themselves, the others for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = byte
        else:
            table[256 + extra] = byte
            extra += 1
    return table


def get_tokenizer(directory: str | Path | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer, from local BPE files (never downloaded)."""
    return _load(str(bpe_dir(directory)))


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Encode as the chapter does: `<|endoftext|>` in the text is the special token."""
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})


def token_text(tokenizer: tiktoken.Encoding, token: int) -> str:
    """One token's text, unique per token: its UTF-8 text, or where its bytes are only part of a
    character, `bytes:` and the bytes as `\\xNN` (OpenAI's convention); ids beyond the tokenizer
    (a model's padded vocabulary) as `<|token N|>`."""
    if not 0 <= token < tokenizer.n_vocab:
        return f"<|token {token}|>"
    data = tokenizer.decode_single_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)
