"""A training run's settings: `TrainSettings` (saved as `RUN/run.json`), their defaults, their
choices and their validation, and the rules for what `--resume` may change. One place: the `train`
command's options take their defaults and choices from here, and run.json is read only through
`TrainSettings.from_file`. Light on purpose (no torch): `gptcli train --help` imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from gptcli.config import GPTConfig
from gptcli.errors import UsageError

RUN_FILE = "run.json"
MAX_SEED = 2**63 - 1
DEFAULT_PROMPT = "Every effort moves you"  # the chapter's prompt, for `train`'s samples and `sample`
DEFAULT_PRESET = "124M"
DEFAULT_CONTEXT_LENGTH = 256  # the chapter's (GPT-2 was trained with 1024)

Schedule = Literal["constant", "cosine"]
Precision = Literal["auto", "fp32", "bf16"]
Sampling = Literal["epochs", "random"]
Device = Literal["auto", "cpu", "cuda", "mps"]
InferenceDtype = Literal["auto", "fp32", "bf16", "int8"]  # sample and eval --dtype (gptcli.runtime)
DropoutRng = Literal["exact", "fast"]
# train --logger: experiment loggers beside metrics.jsonl (gptcli.loggers). Not a setting of the run:
# they are not in run.json, and each invocation (a --resume too) picks its own.
Logger = Literal["tensorboard", "wandb", "csv"]
LOGGERS: tuple[str, ...] = get_args(Logger)

# Settings that may change when a run is resumed; every other one is the run's for good.
RESUMABLE = ("epochs", "max_steps", "save_every", "keep_checkpoints", "device", "plots", "strict_precision")


@dataclass
class TrainSettings:
    """Everything that defines a run; saved as run.json so `--resume` continues the same run."""

    corpus: str
    config: GPTConfig
    out: str | None = None
    epochs: int = 10
    batch_size: int = 2
    micro_batch_size: int | None = None
    lr: float = 4e-4
    min_lr: float = 0.0
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float | None = None
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    train_ratio: float = 0.9
    stride: int | None = None
    sample_prompt: str = DEFAULT_PROMPT
    sample_tokens: int = 50
    device: Device = "auto"
    precision: Precision = "fp32"
    strict_precision: bool = False
    compile: bool = False
    max_steps: int | None = None
    save_every: int | None = None
    init: str | None = None
    plots: bool = True
    sampling: Sampling = "epochs"
    keep_checkpoints: int = 1
    dropout_rng: DropoutRng = "exact"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> TrainSettings:
        """Settings from stored JSON: not an object, missing or unknown keys are usage errors."""
        if not isinstance(data, dict):
            raise UsageError(f"the settings must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
        required = [name for name, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise UsageError(f"missing setting(s): {', '.join(missing)}")
        return cls(**{**data, "config": GPTConfig.from_dict(data["config"])})

    @classmethod
    def from_file(cls, run_dir: str | Path) -> TrainSettings:
        """A run's settings from RUN/run.json, with one clear line when it is missing or damaged."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise UsageError(f"{run_dir}: no {RUN_FILE} there (not a gptcli run directory)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:  # UsageError is neither
            raise UsageError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
        except UsageError as exc:
            raise UsageError(f"{path} is damaged ({exc.message})") from None

    def validate(self) -> None:
        """Every setting in range, before anything is written (usage errors naming the option)."""
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
            _check_int(name, getattr(self, name))
        for name in ("micro_batch_size", "max_steps", "save_every", "stride"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        _check_int("warmup_steps", self.warmup_steps, low=0)
        _check_int("sample_tokens", self.sample_tokens, low=0)
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("min_lr", self.min_lr, low=0.0)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("train_ratio", self.train_ratio, low=0.0, low_open=True, high=1.0)
        if self.grad_clip is not None:
            _check_float("grad_clip", self.grad_clip, low=0.0, low_open=True)
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be between 0 and 2**63-1, got {self.seed}")
        if self.sample_tokens and not self.sample_prompt:
            raise UsageError("--sample-prompt must not be empty (use --sample-tokens 0 for no samples)")
        for name in ("schedule", "precision", "sampling", "device", "dropout_rng"):
            _check_choice(name, getattr(self, name))


DEFAULTS = TrainSettings(corpus="", config=GPTConfig(context_length=DEFAULT_CONTEXT_LENGTH))
"""The default of every setting, for the command's options (`DEFAULTS.lr`, `DEFAULTS.config.drop_rate`)."""


def choices(name: str) -> tuple[str, ...]:
    """The values a Literal-typed setting may take."""
    return get_args(_LITERALS[name])


_LITERALS: dict[str, Any] = {
    "schedule": Schedule, "precision": Precision, "sampling": Sampling, "device": Device, "dropout_rng": DropoutRng,
}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value: int, low: int = 1) -> None:
    if value < low:
        floor = "not be negative" if low == 0 else f"be at least {low}"
        raise UsageError(f"{option_name(name)} must {floor}, got {value}")


def _check_choice(name: str, value: str) -> None:
    allowed = choices(name)
    if value not in allowed:
        raise UsageError(f"{option_name(name)} must be one of {', '.join(allowed)}, got {value!r}")


def _check_float(name: str, value: float, low: float, low_open: bool = False, high: float | None = None) -> None:
    """A usage error unless `value` is finite and within [low, high) (or (low, high) if `low_open`)."""
    bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f" and below {high:g}" if high is not None else "")
    if (
        not math.isfinite(value)
        or value < low
        or (low_open and value == low)
        or (high is not None and value >= high)
    ):
        raise UsageError(f"{option_name(name)} must be a finite number {bounds}, got {value}")


def _same_value(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    paths = name in ("corpus", "init", "out") and old is not None and new is not None
    return paths and os.path.realpath(old) == os.path.realpath(new)


def resumed_settings(stored: TrainSettings, given: dict[str, Any]) -> TrainSettings:
    """`stored` (a run's run.json) with the settings typed again on `--resume` applied. Those in
    RESUMABLE may change; any other may be repeated with its stored value, and a real change is a
    usage error naming each option with the run's value and the one given. Model shape settings
    (`emb_dim`, ...) are named as themselves."""
    current = {**dataclasses.asdict(stored), **stored.config.to_dict()}
    changes = []
    for name, value in given.items():
        if name in RESUMABLE:
            setattr(stored, name, value)
        elif not _same_value(name, current[name], value):
            changes.append(f"{option_name(name)} (the run's {current[name]!r}, given {value!r})")
    if changes:
        allowed = ", ".join(option_name(n) for n in RESUMABLE)
        raise UsageError(f"cannot change {'; '.join(changes)} when resuming; only {allowed} may change")
    return stored
