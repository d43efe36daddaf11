"""What a model file or run is: its config, parameter counts, storage, and where it came from.

Reads every format gptcli reads (a gptcli `.safetensors`, a run directory, OpenAI's release
directory, a Hugging Face directory, the book's `.pth` or chapter-keyed `.safetensors`, a GGUF
written by gptcli) without building the model: the config comes from the files' metadata or shapes,
the parameter counts from the config. Returns plain JSON-ready dicts; never prints.

Run directories are read in both layouts: the model and `trainer.json` at the top of the run, or
`model.safetensors` a link into `checkpoints/step-NNNNNN/` that holds `trainer.json` beside it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gptcli.config import GPTConfig
from gptcli.errors import GptcliError

LAST_EVALUATIONS = 5


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """The chapter's two counts: with a separate output head (untied) and with it shared (tied);
    `parameters` is this model's own (distinct tensors)."""
    c = config.emb_dim
    block = 3 * c * c + (3 * c if config.qkv_bias else 0)  # qkv
    block += c * c + c + 4 * c * c + 4 * c + 4 * c * c + c + 4 * c  # out proj, feed-forward, two norms
    tied = (config.vocab_size + config.context_length) * c + config.n_layers * block + 2 * c
    untied = tied + config.vocab_size * c
    return {"total": tied if config.tie_weights else untied, "untied": untied, "tied": tied}


def _finite(value: Any) -> Any:
    """NaN and infinities as None, so that the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(timespec="seconds")


def _safetensors_dtypes(paths: list[Path]) -> list[str]:
    from safetensors import safe_open

    dtypes: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update(str(handle.get_slice(name).get_dtype()) for name in handle.keys())
    return sorted(dtypes)


def _report(source: Path, kind: str, config: GPTConfig, files: list[Path], dtypes: list[str], origin: dict) -> dict:
    return {
        "path": str(source),
        "format": kind,
        "files": [str(f) for f in files],
        "file_bytes": sum(f.stat().st_size for f in files),
        "dtype": dtypes,
        "config": config.to_dict(),
        "parameters": parameter_counts(config),
        "origin": origin,
    }


def detect_kind(source: Path) -> str:
    """run, gguf, or one of convert's source formats (gptcli, openai, hf, book)."""
    from gptcli.convert import detect_format

    if source.suffix == ".gguf":
        return "gguf"
    if source.is_dir() and any((source / name).exists() for name in ("run.json", "trainer.json", "checkpoints")):
        return "run"
    return detect_format(source)


def model_info(source: str | Path, n_heads: int | None = None) -> dict[str, Any]:
    """Everything `gptcli info` shows about `source`, as a JSON-ready dict."""
    source = Path(source)
    if not source.exists() and not Path(f"{source}.index").exists():
        raise GptcliError(f"not found: {source}")
    kind = detect_kind(source)
    readers = {"run": run_info, "gguf": gguf_info, "gptcli": gptcli_info, "openai": openai_info, "hf": hf_info}
    report = book_info(source, n_heads) if kind == "book" else readers[kind](source)
    return _finite(report)


def gptcli_info(source: Path) -> dict[str, Any]:
    from gptcli.checkpoint import load_config, read_metadata, resolve_model_path

    path = resolve_model_path(source)
    metadata = read_metadata(path)
    origin: dict[str, Any] = {}
    if "converted_from" in metadata:
        origin["converted_from"] = metadata["converted_from"]
    if "step" in metadata:
        origin["step"] = int(metadata["step"])
    if "book_optimizer_steps" in metadata:
        origin["book_optimizer_steps"] = int(metadata["book_optimizer_steps"])
    origin["saved"] = _mtime(path)
    return _report(source, "gptcli", load_config(path), [path], _safetensors_dtypes([path]), origin)


def _run_trainer_state(run_dir: Path, model_file: Path) -> dict[str, Any]:
    """trainer.json beside the model's real file (checkpoint-directory layout), else at the top."""
    from gptcli.rundir import TRAINER_JSON

    for candidate in (model_file.resolve().parent / TRAINER_JSON, run_dir / TRAINER_JSON):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise GptcliError(f"{candidate} is not valid JSON ({exc})") from None
    return {}


def run_info(run_dir: Path) -> dict[str, Any]:
    """A training run: its model (the last checkpoint), settings, progress and evaluations."""
    from gptcli.checkpoint import load_config, resolve_model_path
    from gptcli.settings import RUN_FILE, TrainSettings
    from gptcli.train import read_metrics

    model_file = resolve_model_path(run_dir)
    settings = TrainSettings.from_file(run_dir) if (run_dir / RUN_FILE).is_file() else None
    trainer = _run_trainer_state(run_dir, model_file)
    origin = {
        "corpus": settings.corpus if settings else None,
        "init": settings.init if settings else None,
        "epochs_done": trainer.get("epoch"),
        "planned_epochs": settings.epochs if settings else None,
        "steps": trainer.get("steps_done"),
        "tokens_seen": trainer.get("tokens_seen"),
        "best_val_loss": trainer.get("best_val_loss"),
        "last_checkpoint": _mtime(model_file.resolve()),
        "checkpoint": str(model_file.resolve()),
        "last_evaluations": read_metrics(run_dir)[-LAST_EVALUATIONS:],
    }
    dtypes = _safetensors_dtypes([model_file])
    return _report(run_dir, "run", load_config(model_file), [model_file.resolve()], dtypes, origin)


def openai_info(source: Path) -> dict[str, Any]:
    from gptcli.convert import _TF_DTYPES as TF_DTYPES
    from gptcli.convert import TensorBundle, _checkpoint_prefix, openai_plan

    plan = openai_plan(source, verify_checksums=False)
    if source.is_dir():
        prefix = _checkpoint_prefix(source)
    else:
        prefix = source.with_suffix("") if source.suffix == ".index" else source
    bundle = TensorBundle(prefix, verify_checksums=False)
    files = [bundle.index_path] + [bundle.shard_path(i) for i in range(bundle.num_shards)]
    dtypes = sorted({TF_DTYPES.get(e.dtype, (str(e.dtype), ""))[0] for e in bundle.entries.values()})
    origin = {"source": "OpenAI's GPT-2 release (TensorFlow checkpoint)"}
    return _report(source, "openai", plan.config, [f for f in files if f.is_file()], dtypes, origin)


def hf_info(source: Path) -> dict[str, Any]:
    from gptcli.convert import _hf_files, hf_plan

    plan = hf_plan(source)
    config_path, weights = _hf_files(source)
    files = sorted(set(weights.values()))
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    origin = {"source": "Hugging Face", "architectures": hf.get("architectures"), "model_type": hf.get("model_type")}
    return _report(source, "hf", plan.config, [config_path, *files], _safetensors_dtypes(files), origin)


def book_info(source: Path, n_heads: int | None) -> dict[str, Any]:
    from gptcli.formats.book import BookSource, infer_config

    book = BookSource(source)
    config = infer_config(book, n_heads)
    origin: dict[str, Any] = {"source": "the book's GPTModel state dict"}
    if book.optimizer_steps is not None:
        origin["optimizer_steps"] = book.optimizer_steps
    dtypes = sorted({book.dtype(name) for name in book.shapes})
    return _report(source, "book", config, [source], dtypes, origin)


def gguf_info(source: Path) -> dict[str, Any]:
    from gptcli.formats.gguf import FILE_TYPES, gguf_config, read_gguf

    metadata, tensors = read_gguf(source)
    config = gguf_config(source, metadata)
    dtypes = sorted({t.tensor_type.name for t in tensors})
    type_names = {code: name for name, code in FILE_TYPES.items()}
    origin = {
        "converted_from": metadata.get("gptcli.converted_from"),
        "name": metadata.get("general.name"),
        "architecture": metadata.get("general.architecture"),
        "gguf_type": type_names.get(metadata.get("general.file_type", -1), "other"),
        "tokenizer": metadata.get("tokenizer.ggml.model"),
    }
    return _report(source, "gguf", config, [source], dtypes, origin)
