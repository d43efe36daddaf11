"""The fixed choices of `fetch`, `prepare` and `convert`, each defined once as a Literal: the
commands' options take their types from here (so `--help` lists them and Typer refuses anything
else), and the core checks its arguments against the same values. No imports: `--help` stays fast.
(Training's choices live with its settings, in `gptcli.settings`.)
"""

from __future__ import annotations

from typing import Literal, get_args

FetchWhat = Literal["verdict", "tokenizer", "gpt2"]
GPT2Size = Literal["124M", "355M", "774M", "1558M"]
SplitMode = Literal["auto", "document", "position"]
DecodeErrors = Literal["strict", "replace"]
SourceFormat = Literal["auto", "openai", "hf", "gptcli", "book"]
TargetFormat = Literal["gptcli", "hf", "book", "gguf"]
GGUFType = Literal["f32", "f16", "q8_0"]

GPT2_SIZES: tuple[str, ...] = get_args(GPT2Size)
SPLIT_MODES: tuple[str, ...] = get_args(SplitMode)
DECODE_ERRORS: tuple[str, ...] = get_args(DecodeErrors)
SOURCE_FORMATS: tuple[str, ...] = get_args(SourceFormat)
TARGET_FORMATS: tuple[str, ...] = get_args(TargetFormat)
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)
