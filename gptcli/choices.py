"""The fixed choices of the commands, each defined once as a Literal: the commands' options take
their types from here (so `--help` lists them and Typer refuses anything else), and the core checks
its arguments against the same values (training's settings, run.json, the kernels' dropout streams).
No imports: `--help` stays fast.
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

# Training (gptcli.settings) and the devices and precisions of train, sample and eval (gptcli.runtime).
Schedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16"]
Sampling = Literal["epochs", "random"]
Device = Literal["auto", "cpu", "cuda", "mps"]
InferenceDtype = Literal["auto", "fp32", "bf16", "int8", "int4"]  # sample and eval --dtype
DropoutRng = Literal["exact", "fast"]  # train --dropout-rng, and the kernels' dropout (gptcli.kernels)
# train --logger: experiment loggers beside metrics.jsonl (gptcli.loggers). Not a setting of the run:
# they are not in run.json, and each invocation (a --resume too) picks its own.
Logger = Literal["tensorboard", "wandb", "csv"]

GPT2_SIZES: tuple[str, ...] = get_args(GPT2Size)
SPLIT_MODES: tuple[str, ...] = get_args(SplitMode)
DECODE_ERRORS: tuple[str, ...] = get_args(DecodeErrors)
SOURCE_FORMATS: tuple[str, ...] = get_args(SourceFormat)
TARGET_FORMATS: tuple[str, ...] = get_args(TargetFormat)
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)
DROPOUT_RNGS: tuple[DropoutRng, ...] = get_args(DropoutRng)
LOGGERS: tuple[str, ...] = get_args(Logger)
