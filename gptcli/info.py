"""What a model file or run is: its config, parameter counts, storage, and where it came from.

Reads every format gptcli reads (a gptcli `.safetensors`, a run directory, OpenAI's release
directory, a Hugging Face directory, the book's `.pth` or chapter-keyed `.safetensors`, a GGUF
written by gptcli) without building the model: the config comes from the files' metadata or shapes,
the parameter counts from the config. What a file holds is each format module's `describe` (see
`gptcli.formats.registry`); run directories and the report are this module's. Returns plain
JSON-ready dicts; never prints.

Run directories are read in both layouts: the model and `trainer.json` at the top of the run, or
`model.safetensors` a link into `checkpoints/step-NNNNNN/` that holds `trainer.json` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptcli.config import parameter_counts
from gptcli.errors import GptcliError
from gptcli.formats.gptcli import saved_at
from gptcli.formats.plan import Description, ReadOptions
from gptcli.formats.registry import FORMATS, detect_format
from gptcli.formats.safetensors_io import safetensors_dtypes
from gptcli.jsonio import finite_or_null

LAST_EVALUATIONS = 5


def _report(source: Path, kind: str, found: Description) -> dict[str, Any]:
    return {
        "path": str(source),
        "format": kind,
        "files": [str(f) for f in found.files],
        "file_bytes": sum(f.stat().st_size for f in found.files),
        "dtype": found.dtypes,
        "config": found.config.to_dict(),
        "parameters": parameter_counts(found.config),
        "origin": found.origin,
    }


def is_run_dir(source: Path) -> bool:
    return source.is_dir() and any((source / name).exists() for name in ("run.json", "trainer.json", "checkpoints"))


def detect_kind(source: Path) -> str:
    """run, gguf, or one of convert's source formats (gptcli, openai, hf, book)."""
    if FORMATS["gguf"].detect(source):
        return "gguf"
    if is_run_dir(source):
        return "run"
    return detect_format(source)


def model_info(source: str | Path, n_heads: int | None = None) -> dict[str, Any]:
    """Everything `gptcli info` shows about `source`, as a JSON-ready dict."""
    from gptcli.paths import check_not_dangling, not_found

    source = Path(source)
    check_not_dangling(source, "run or file")
    if not source.exists() and not Path(f"{source}.index").exists():
        raise GptcliError(not_found(source))
    kind = detect_kind(source)
    if kind == "run":
        return finite_or_null(_report(source, kind, describe_run(source)))
    # Checksums are for conversions: describing reads no tensor data.
    found = FORMATS[kind].describe(source, ReadOptions(verify_checksums=False, n_heads=n_heads))
    return finite_or_null(_report(source, kind, found))


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


def describe_run(run_dir: Path) -> Description:
    """A training run: its model (the last checkpoint), settings, progress and evaluations."""
    from gptcli.modelfile import load_config, resolve_model_path
    from gptcli.rundir import read_metrics
    from gptcli.settings import RUN_FILE, TrainSettings

    model_file = resolve_model_path(run_dir)
    config = load_config(model_file)  # the checked reader first: a damaged file is one line
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
        "last_checkpoint": saved_at(model_file.resolve()),
        "checkpoint": str(model_file.resolve()),
        "last_evaluations": read_metrics(run_dir)[-LAST_EVALUATIONS:],
    }
    dtypes = safetensors_dtypes([model_file])
    return Description(config, [model_file.resolve()], dtypes, origin)
