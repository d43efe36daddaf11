"""A training run's settings, and the `train` command's options, each declared once
(`gptcli.options.option`: name, type, default, help, panel, range check, and whether `--resume` may
change it): `ModelOptions` (the model shape, or `--init` weights) and `TrainOptions` (kept as given)
resolve into `TrainSettings`, saved as `RUN/run.json` and read back only through
`TrainSettings.from_file`. The command's Typer options, the validation and the resume rules all come
from these declarations. Light on purpose (no torch: the model and checkpoint modules are imported
by the functions that need them): `gptcli train --help` imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.choices import Device, DropoutRng, Precision, Sampling, Schedule
from gptcli.choices import InferenceDtype as InferenceDtype  # re-exported: sample's and eval's --dtype
from gptcli.config import PRESETS, GPTConfig, get_preset
from gptcli.errors import GptcliError, UsageError
from gptcli.options import at_least, between, check_options, check_types, finite, option, resumable

if TYPE_CHECKING:
    from gptcli.model import GPT

RUN_FILE = "run.json"
MAX_SEED = 2**63 - 1
DEFAULT_PROMPT = "Every effort moves you"  # the chapter's prompt, for `train`'s samples and `sample`
DEFAULT_PRESET = "124M"
DEFAULT_CONTEXT_LENGTH = 256  # the chapter's (GPT-2 was trained with 1024)

# The panels of `gptcli train --help`, in that order.
MODEL = "Model shape"
DATA = "Data"
OPTIM = "Optimization"
LOOP = "Evaluation, samples and checkpoints"
RUNTIME = "Runtime and output"


@dataclass
class TrainOptions:
    """The options of a run that its settings keep as given, in `--help`'s order."""

    # Data
    train_ratio: float = option(0.9, "Share of the text (by characters) used for training.", DATA,
                                check=finite(0.0, above=True, below=1.0))
    stride: int | None = option(None, "Step between windows (default: context length).", DATA, check=at_least(1))
    sampling: Sampling = option(
        "epochs", "epochs: shuffled passes over all windows (the chapter's); random: every step draws windows at "
        "random token offsets (nanoGPT-style; with --max-steps, that alone sets the length).", DATA,
    )
    # Optimization
    epochs: int = option(10, "Passes over the training windows.", OPTIM, check=at_least(1), resumable=True)
    batch_size: int = option(
        2, "Sequences per optimizer step (summed over processes and accumulation micro-batches).", OPTIM,
        check=at_least(1),
    )
    micro_batch_size: int | None = option(
        None, "Sequences per forward/backward pass; smaller than the per-process batch means gradient "
        "accumulation (default: the whole batch).", OPTIM, check=at_least(1),
    )
    lr: float = option(4e-4, "Peak learning rate (AdamW).", OPTIM, check=finite(0.0, above=True))
    weight_decay: float = option(0.1, "AdamW weight decay.", OPTIM, check=finite(0.0))
    schedule: Schedule = option("constant", "Learning-rate schedule after warmup.", OPTIM)
    warmup_steps: int = option(0, "Linear warmup steps (lr/warmup up to --lr).", OPTIM, check=at_least(0))
    min_lr: float = option(0.0, "Final learning rate of the cosine decay.", OPTIM, check=finite(0.0))
    grad_clip: float | None = option(None, "Clip the gradient norm to this value (default: off).", OPTIM,
                                     check=finite(0.0, above=True))
    max_steps: int | None = option(None, "Stop after this many optimizer steps.", OPTIM, check=at_least(1),
                                   resumable=True)
    seed: int = option(123, "Random seed (initialisation, shuffling, dropout).", OPTIM,
                       check=between(0, MAX_SEED, "2**63-1"))
    # Evaluation, samples and checkpoints
    eval_freq: int = option(5, "Evaluate every this many steps.", LOOP, check=at_least(1))
    eval_iter: int = option(5, "Batches per evaluation (train and val).", LOOP, check=at_least(1))
    sample_prompt: str = option(DEFAULT_PROMPT, "Prompt of the sample after each epoch.", LOOP)
    sample_tokens: int = option(50, "Tokens in each epoch's greedy sample (0: none).", LOOP, check=at_least(0))
    save_every: int | None = option(
        None, "Also checkpoint every this many steps (default: after each epoch and at the end).", LOOP,
        check=at_least(1), resumable=True,
    )
    keep_checkpoints: int = option(
        1, "Checkpoints kept in RUN/checkpoints (the newest ones; each is committed atomically).", LOOP,
        check=at_least(1), resumable=True,
    )
    plots: bool = option(True, "Write loss.png and perplexity.png.", LOOP, resumable=True)
    # Runtime and output
    device: Device = option("auto", "auto: cuda, then mps, then cpu.", RUNTIME, resumable=True)
    precision: Precision = option(
        "fp32", "fp32 (the chapter's, exact); bf16 autocast; auto: bf16 on CUDA with bf16 and on CPUs with native "
        "bf16 (AVX512_BF16, AMX), else fp32. bf16 where it is not native runs fp32 with a note (it would be "
        "slower).", RUNTIME,
    )
    strict_precision: bool = option(
        False, "Refuse (exit 2) instead of running fp32 when bf16 is not native here.", RUNTIME,
        flags=("--strict-precision",), resumable=True,
    )
    compile: bool = option(False, "torch.compile the model.", RUNTIME, flags=("--compile",))
    dropout_rng: DropoutRng = option(
        "exact", "exact: dropout masks are torch's own (nn.Dropout's, so a seeded run reproduces the chapter's "
        "numbers); fast: cheaper masks from another random stream (about 2x faster to draw, a few percent of a "
        "CPU training step; the same rate, other numbers than the book's). GPTCLI_KERNELS=0 turns gptcli's "
        "kernels off and uses torch's dropout.", RUNTIME,
    )


@dataclass
class ModelOptions:
    """The model shape options: a preset with the fields typed one by one over it, or --init
    weights (whose shape the options typed must match)."""

    preset: str = option(DEFAULT_PRESET, f"Model shape preset: {', '.join(PRESETS)} (aliases gpt2, gpt2-small, "
                         "gpt2-medium, gpt2-large, gpt2-xl).", MODEL)
    context_length: int = option(DEFAULT_CONTEXT_LENGTH, "Tokens per training window (the chapter's 256; GPT-2 was "
                                 "trained with 1024).", MODEL)
    emb_dim: int | None = option(None, "Embedding width (default: preset's)", MODEL)
    n_heads: int | None = option(None, "Attention heads (default: preset's)", MODEL)
    n_layers: int | None = option(None, "Transformer blocks (default: preset's)", MODEL)
    drop_rate: float = option(GPTConfig.drop_rate, "Dropout rate.", MODEL)
    qkv_bias: bool = option(GPTConfig.qkv_bias, "Bias in the query/key/value projections.", MODEL)
    vocab_size: int = option(GPTConfig.vocab_size, "Vocabulary size (GPT-2 BPE: 50257).", MODEL)
    tie_weights: bool = option(GPTConfig.tie_weights, "Share the output head with the token embedding (GPT-2 does; "
                               "the chapter does not).", MODEL)
    init: Path | None = option(None, "Start from saved weights (.safetensors from a run or `gptcli convert`, or a run "
                               "directory); the model shape comes from them.", MODEL)

    def config(self, typed: Collection[str]) -> GPTConfig:
        """The model's config: the --init weights' (with --drop-rate, if typed), else the preset's with
        the shape options over it. GPTConfig checks the shape."""
        if self.init is not None:
            return resolve_init_config(self.init, self, typed)
        return get_preset(self.preset).replace(
            context_length=self.context_length, emb_dim=self.emb_dim, n_heads=self.n_heads, n_layers=self.n_layers,
            drop_rate=self.drop_rate, qkv_bias=self.qkv_bias, vocab_size=self.vocab_size,
            tie_weights=self.tie_weights,
        )

    def preset_shape(self, typed: Collection[str]) -> list[tuple[str, object]]:
        """A typed --preset stands for the fields of its shape not typed one by one: those, as
        (field, value)."""
        if "preset" not in typed:
            return []
        preset = get_preset(self.preset)
        return [(name, getattr(preset, name)) for name in ("emb_dim", "n_heads", "n_layers") if name not in typed]


SHAPE = tuple(f.name for f in dataclasses.fields(ModelOptions) if f.name in GPTConfig.__dataclass_fields__)
"""The options that are fields of the model's config (named as themselves in messages)."""


@dataclass
class RunSource:
    """What the options resolve to: the corpus, the model's config (from the shape options or the
    --init weights), the run directory and the --init weights file."""

    corpus: str
    config: GPTConfig
    out: str | None = None
    init: str | None = None


@dataclass
class TrainSettings(TrainOptions, RunSource):
    """Everything that defines a run; saved as run.json so `--resume` continues the same run."""

    @classmethod
    def of(cls, options: TrainOptions, *, corpus: str, config: GPTConfig, out: str | None = None,
           init: str | None = None) -> TrainSettings:
        """A new run's settings: its options as given, and what the others resolved to."""
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(TrainOptions)}
        return cls(corpus=corpus, config=config, out=out, init=init, **given)

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
        check_types(cls, {k: v for k, v in data.items() if k != "config"})
        return cls(**{**data, "config": GPTConfig.from_dict(data["config"])})

    @classmethod
    def from_file(cls, run_dir: str | Path) -> TrainSettings:
        """A run's settings from RUN/run.json, with one clear line when it is missing or damaged (a
        value out of range is named by its key: nobody typed it)."""
        from gptcli.paths import check_not_dangling

        path = Path(run_dir) / RUN_FILE
        check_not_dangling(Path(run_dir), "run")
        if not path.is_file():
            raise UsageError(f"{run_dir}: no {RUN_FILE} there (not a gptcli run directory)")
        try:
            settings = cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
            settings.validate(keys=True)
            return settings
        except (OSError, ValueError, TypeError) as exc:  # UsageError is neither
            raise UsageError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
        except UsageError as exc:
            raise UsageError(f"{path} is damaged ({exc.message})") from None

    def validate(self, keys: bool = False) -> None:
        """Every setting in range, before anything is written (usage errors naming the option, or
        with `keys` the key of run.json)."""
        check_options(self, keys)
        if self.sample_tokens and not self.sample_prompt:
            name = "sample_prompt" if keys else "--sample-prompt"
            raise UsageError(f"{name} must not be empty (use --sample-tokens 0 for no samples)")


DEFAULTS = TrainSettings(corpus="", config=GPTConfig(context_length=DEFAULT_CONTEXT_LENGTH))
"""The default of every setting (`DEFAULTS.lr`, `DEFAULTS.config.drop_rate`)."""

RESUMABLE = resumable(TrainOptions)
"""The settings that may change when a run is resumed; every other one is the run's for good."""


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same_value(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    paths = name in ("corpus", "init", "out") and old is not None and new is not None
    return paths and os.path.realpath(old) == os.path.realpath(new)


def resumed_settings(stored: TrainSettings, given: Sequence[tuple[str, object]]) -> TrainSettings:
    """`stored` (a run's run.json) with the settings typed again on `--resume`, as (setting, value)
    in the order typed, applied. Those in RESUMABLE may change; any other may be repeated with its
    stored value, and a real change is a usage error naming each option with the run's value and
    the one given. Model shape settings (`emb_dim`, ...) are named as themselves."""
    current = {**dataclasses.asdict(stored), **stored.config.to_dict()}
    changes = []
    for name, value in given:
        if name in RESUMABLE:
            setattr(stored, name, value)
        elif not _same_value(name, current[name], value):
            changes.append(f"{option_name(name)} (the run's {current[name]!r}, given {value!r})")
    if changes:
        allowed = ", ".join(option_name(n) for n in RESUMABLE)
        raise UsageError(f"cannot change {'; '.join(changes)} when resuming; only {allowed} may change")
    return stored

# --- --init -------------------------------------------------------------------------------------


def resolve_init_path(init: str | Path) -> Path:
    """The weights file of `--init`: a .safetensors file, or a run directory's model file."""
    from gptcli.modelfile import resolve_model_path

    try:
        return resolve_model_path(init)
    except GptcliError:
        raise GptcliError(f"--init weights not found: {init}") from None


def resolve_init_config(init: str | Path, model: ModelOptions, typed: Collection[str]) -> GPTConfig:
    """The config of `--init` weights: the shape options typed must agree with it, and only the drop
    rate may differ from it."""
    from gptcli.modelfile import load_config

    config = load_config(resolve_init_path(init))
    conflicting = [name for name in SHAPE if name in typed and name != "drop_rate"
                   and getattr(config, name) != getattr(model, name)]
    if conflicting:
        names = ", ".join(option_name(name) for name in conflicting)
        raise UsageError(f"{names} conflict with the shapes of the --init weights {init}")
    return config.replace(drop_rate=model.drop_rate if "drop_rate" in typed else None)


def build_model(settings: TrainSettings, load_init: bool = True) -> GPT:
    """A fresh model (seeded before this call), or one started from `settings.init` (not needed
    when a checkpoint will be loaded over it: a resumed run works without its --init file)."""
    from safetensors.torch import load_file

    from gptcli.model import GPT
    from gptcli.modelfile import load_weights

    model = GPT(settings.config)
    if settings.init and load_init:
        init = resolve_init_path(settings.init)
        load_weights(model, load_file(str(init)), init)
    return model
