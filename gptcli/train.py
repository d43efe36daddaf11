"""Pretraining: the chapter's `train_model_simple` loop and what its tips add.

`train(settings)` is a generator of events (`RunStarted`, `StepDone`, `Evaluation`, `Sample`,
`CheckpointSaved`, `RunFinished`); it never prints. Defaults reproduce the chapter's run: AdamW
(lr 4e-4, weight decay 0.1), batch 2, evaluation every 5 steps on 5 batches, a greedy 50-token
sample after each epoch, seed 123. Beyond the chapter, all off by default: linear warmup and
cosine decay, gradient clipping, gradient accumulation, bf16 autocast, torch.compile, DDP.

The corpus is a text file or a `gptcli prepare` directory (memory-mapped tokens). `sampling`
"epochs" (the chapter's) passes over all windows in a shuffled order each epoch; "random" draws
every step's windows at random token offsets (nanoGPT-style), for corpora too large for epochs.

Distributed (launched by torchrun, WORLD_SIZE > 1): each rank takes its contiguous share of every
global batch, DistributedDataParallel averages the gradients, and only rank 0 evaluates, samples and
writes. Every rank draws from torch's global RNG exactly what a single process would (data order,
evaluation batches), so shuffling stays in step and rank 0's saved RNG state resumes all of them;
dropout masks come from a generator seeded by (seed, rank, step), different on every rank.

A run directory holds `run.json` (the settings), `metrics.jsonl`, `loss.png`, `perplexity.png` and
its checkpoints (`gptcli.rundir`: each one `model.safetensors`, `trainer.safetensors` with the
optimizer and RNG states, and `trainer.json` with the step, epoch and position in the data, committed
atomically). Resuming restores all of it, so on CPU a resumed run reproduces an uninterrupted one
exactly. A run is locked while it trains; a diverged run (non-finite loss, gradient or weights)
stops with exit code 3 and never saves.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import __version__, jsonio, rundir
from gptcli.checkpoint import (
    MODEL_FILE,
    load_config,
    load_weights,
    resolve_model_path,
)
from gptcli.config import GPTConfig
from gptcli.distributed import Distributed, all_agree, init_distributed, leave_process_group, rank_dropout_rng
from gptcli.durable import atomic_write, atomic_write_text
from gptcli.errors import EXIT_NONFINITE, GptcliError, UsageError
from gptcli.evaluate import batch_loss, mean_batch_loss, perplexity
from gptcli.paths import RUNS_DIR
from gptcli.rundir import TRAINER_FILE, TRAINER_JSON
from gptcli.runtime import resolve_device, resolve_precision
from gptcli.settings import RUN_FILE, TrainSettings

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT

METRICS_FILE = "metrics.jsonl"


# --- events -------------------------------------------------------------------------------------


@dataclass
class RunStarted:
    out_dir: Path
    device: str
    config: GPTConfig
    parameters: int
    train_tokens: int
    val_tokens: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    world_size: int
    settings: TrainSettings
    precision: str  # what runs: --precision auto resolved, or bf16 fallen back to fp32


@dataclass
class StepDone:
    epoch: int
    step: int
    tokens_seen: int
    loss: float
    lr: float
    tokens_per_second: float
    grad_norm: float  # the global gradient norm before clipping (for the experiment loggers)


@dataclass
class Evaluation:
    epoch: int
    step: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    train_ppl: float
    val_ppl: float
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Sample:
    epoch: int
    step: int
    text: str


@dataclass
class Notice:
    """Something the user should know that does not stop the run."""

    text: str


@dataclass
class CheckpointSaved:
    path: Path
    step: int


@dataclass
class RunFinished:
    reason: str  # "completed", "max_steps" or "interrupted"
    out_dir: Path
    steps: int
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    best_val_loss: float | None
    final: Evaluation | None = None
    files: list[Path] = field(default_factory=list)


Event = RunStarted | StepDone | Evaluation | Sample | Notice | CheckpointSaved | RunFinished


# --- schedule -----------------------------------------------------------------------------------


def learning_rate(step: int, settings: TrainSettings, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then
    constant, or cosine decay from lr to min_lr over the remaining steps."""
    peak = settings.lr
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return peak
    decay_steps = max(1, total_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / decay_steps)
    return settings.min_lr + (peak - settings.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- run directory ------------------------------------------------------------------------------


def default_run_dir(corpus: str) -> Path:
    stem = Path(corpus).name.split(".")[0] or "corpus"
    return RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


def point_latest(run_dir: Path) -> None:
    """Make runs/latest point at `run_dir` (replaced atomically)."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    latest = RUNS_DIR / "latest"
    target = run_dir.resolve()
    if target.parent == RUNS_DIR.resolve():
        target = Path(target.name)  # relative, so the runs directory can move
    tmp = RUNS_DIR / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, latest)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- trainer state ------------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into tensors (for safetensors) and JSON-able rest."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    import torch

    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    import torch

    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


@dataclass
class Position:
    """Where the run is: optimizer steps done, the epoch, the batch within it and its order seed."""

    steps_done: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_seed: int | None = None
    tokens_seen: int = 0
    best_val_loss: float | None = None
    precision: str | None = None  # what ran (--precision auto, or bf16 fallen back to fp32), for the record


def checkpoint_writers(
    model: GPT, optimizer: torch.optim.Optimizer, position: Position
) -> dict[str, Callable[[Path], None]]:
    """How to write each file of a checkpoint (model last: `sample` needs only it). All carry the
    step, and resume refuses files whose steps disagree (hand-edited or mixed checkpoints)."""
    from gptcli.checkpoint import write_model, write_tensors

    tensors, meta = optimizer_tensors(optimizer)
    tensors.update(rng_tensors())
    state = {**dataclasses.asdict(position), "optimizer": meta, "gptcli_version": __version__}
    step = {"step": str(position.steps_done)}
    return {
        TRAINER_FILE: lambda path: write_tensors(path, tensors, step),
        TRAINER_JSON: lambda path: path.write_text(jsonio.dumps(state, indent=2) + "\n", encoding="utf-8"),
        MODEL_FILE: lambda path: write_model(path, model, step),
    }


def _damaged(path: Path, what: str) -> GptcliError:
    return GptcliError(
        f"cannot resume: {path} {what}; start a new run from saved weights with --init "
        f"(e.g. --init {path.parent / MODEL_FILE}, if that file is intact)"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as exc:
        raise _damaged(path, f"is damaged or truncated ({str(exc).splitlines()[0][:80]})") from None


def _read_trainer_json(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, "is missing") from None
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"is not valid JSON ({exc})") from None
    required = {"steps_done", "epoch", "batch_in_epoch", "tokens_seen", "optimizer"}
    if not isinstance(state, dict) or not required <= state.keys():
        raise _damaged(path, f"is not a trainer state (it needs the keys {', '.join(sorted(required))})")
    return state


def load_checkpoint(checkpoint: Path, model: GPT, optimizer: torch.optim.Optimizer) -> Position:
    """Restore the model, optimizer and RNG states from a checkpoint directory; where the run was."""
    state = _read_trainer_json(checkpoint / TRAINER_JSON)
    tensors, trainer_meta = _read_safetensors(checkpoint / TRAINER_FILE)
    weights, model_meta = _read_safetensors(checkpoint / MODEL_FILE)
    steps = (str(state["steps_done"]), trainer_meta.get("step"), model_meta.get("step"))
    if len(set(steps)) != 1:
        raise _damaged(checkpoint, f"holds files of different steps (trainer.json {steps[0]}, "
                                   f"trainer.safetensors {steps[1]}, model.safetensors {steps[2]})")
    load_weights(model, weights, checkpoint / MODEL_FILE)
    try:
        restore_optimizer(optimizer, tensors, state["optimizer"])
        restore_rng(tensors)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _damaged(checkpoint / TRAINER_FILE, f"does not fit the model ({type(exc).__name__}: {exc})") from None
    fields = {f.name for f in dataclasses.fields(Position)}
    return Position(**{k: v for k, v in state.items() if k in fields})


# --- plots --------------------------------------------------------------------------------------


def write_plots(run_dir: Path, metrics: list[dict[str, Any]], steps_per_epoch: int) -> list[Path]:
    """The chapter's two figures: loss over epochs (tokens-seen on a twin axis), and perplexity."""
    if not metrics:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [(m["step"] + 1) / steps_per_epoch for m in metrics]
    tokens = [m["tokens_seen"] for m in metrics]
    train = [m["train_loss"] for m in metrics]
    val = [m["val_loss"] for m in metrics]

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs, train, label="Training loss")
    ax1.plot(epochs, val, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()
    ax2.plot(tokens, train, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    loss_png = run_dir / "loss.png"
    atomic_write(loss_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(tokens, [m["train_ppl"] for m in metrics], label="Training perplexity")
    ax.plot(tokens, [m["val_ppl"] for m in metrics], linestyle="-.", label="Validation perplexity")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Perplexity")
    ax.set_yscale("log")
    ax.set_title("Perplexity over training")
    ax.legend(loc="upper right")
    fig.tight_layout()
    ppl_png = run_dir / "perplexity.png"
    atomic_write(ppl_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return [loss_png, ppl_png]


# --- the loop -----------------------------------------------------------------------------------


def build_model(settings: TrainSettings, load_init: bool = True) -> GPT:
    """A fresh model (seeded before this call), or one started from `settings.init` (not needed
    when a checkpoint will be loaded over it: a resumed run works without its --init file)."""
    from safetensors.torch import load_file

    from gptcli.model import GPT

    model = GPT(settings.config)
    if settings.init and load_init:
        init = resolve_init_path(settings.init)
        load_weights(model, load_file(str(init)), init)
    return model


def resolve_init_path(init: str | Path) -> Path:
    """The weights file of `--init`: a .safetensors file, or a run directory's model file."""
    try:
        return resolve_model_path(init)
    except GptcliError:
        raise GptcliError(f"--init weights not found: {init}") from None


def resolve_init_config(init: str, overrides: dict[str, Any]) -> GPTConfig:
    """The config of `--init` weights; only the drop rate may differ from them."""
    config = load_config(resolve_init_path(init))
    conflicting = {
        k: v for k, v in overrides.items() if v is not None and k != "drop_rate" and getattr(config, k) != v
    }
    if conflicting:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in conflicting)
        raise UsageError(f"{names} conflict with the shapes of the --init weights {init}")
    return config.replace(drop_rate=overrides.get("drop_rate"))


class RunDirectory:
    """The run directory as one training process holds it: locked while the run trains (rank 0),
    checkpoints committed atomically, `runs/latest` moved after the first commit, and a directory
    this run created removed again when the run fails before its first checkpoint."""

    def __init__(self, path: Path, keep: int, main: bool) -> None:
        self.path, self.keep, self.main = path, keep, main
        self.created = False
        self.lock_fd: int | None = None
        self.saved_step: int | None = None
        self.pointed = False  # runs/latest, moved by this process's first commit

    def open(self, resume: bool) -> Path | None:
        """Create (or find), lock and clean the directory; the checkpoint to resume from, if any."""
        if resume and not self.path.is_dir():
            raise UsageError(f"--resume {self.path}: no such run directory")
        if not self.main:
            return rundir.checkpoint_to_resume(self.path) if resume else None
        self.created = rundir.create_run_dir(self.path)
        self.lock_fd = rundir.lock_run(self.path)
        rundir.remove_leftovers(self.path)
        checkpoint = rundir.checkpoint_to_resume(self.path)
        if checkpoint is not None and not resume:
            raise UsageError(
                f"{self.path} already holds a run; continue it with --resume {self.path} or pick another --out"
            )
        return checkpoint

    def kept(self, which: str = "last") -> str:
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"the {which} checkpoint (step {self.saved_step}) is kept"

    def save(self, model: GPT, optimizer: torch.optim.Optimizer, position: Position) -> CheckpointSaved:
        if not all(bool(p.isfinite().all()) for p in model.parameters()):
            raise GptcliError(
                f"the weights became NaN or infinite by step {position.steps_done}; stopped without saving "
                f"({self.kept()}). Try a lower --lr, --grad-clip or --warmup-steps", EXIT_NONFINITE,
            )
        try:
            step_dir = rundir.write_checkpoint(self.path, position.steps_done,
                                               checkpoint_writers(model, optimizer, position))
        except Exception as exc:
            raise self._save_error(exc) from None
        rundir.commit_checkpoint(self.path, step_dir)
        if not self.pointed:
            point_latest(self.path)
            self.pointed = True
        self.saved_step = position.steps_done
        rundir.prune_checkpoints(self.path, self.keep)
        return CheckpointSaved(step_dir, position.steps_done)

    def _save_error(self, exc: Exception) -> GptcliError:
        text = str(exc)
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)) or any(
            sign in text for sign in ("os error 28", "os error 27", "No space left", "File too large")
        )
        if full:  # safetensors reports a failed write as its own error type, not OSError
            return GptcliError(f"the disk is full; {self.kept('last complete')}")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text.splitlines()[0][:100]
        return GptcliError(f"cannot save a checkpoint in {self.path}: {reason}; {self.kept('last complete')}")

    def close(self, failed: bool) -> None:
        # Only the lock holder removes: a process that lost the race for the lock leaves it alone.
        if failed and self.created and self.saved_step is None and self.lock_fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            rundir.unlock_run(self.lock_fd)
            self.lock_fd = None


def _start_files(run: RunDirectory, settings: TrainSettings, position: Position) -> None:
    """run.json, and metrics.jsonl without the evaluations after the checkpoint (the resumed run
    replays them)."""
    atomic_write_text(run.path / RUN_FILE, jsonio.dumps(settings.to_dict(), indent=2) + "\n")
    kept = [m for m in read_metrics(run.path) if m["step"] < position.steps_done]
    atomic_write_text(run.path / METRICS_FILE, "".join(jsonio.dumps(m) + "\n" for m in kept))


def _check_enough_data(splits: Any, settings: TrainSettings, prepared: bool) -> None:
    from gptcli.data import check_enough_tokens

    context = settings.config.context_length
    if prepared and min(len(splits.train), len(splits.val)) <= context:
        which = "training" if len(splits.train) <= context else "validation"
        raise UsageError(
            f"not enough tokens for the {which} loader in {settings.corpus} ({len(splits.train)} training, "
            f"{len(splits.val)} validation tokens, context length {context}); lower --context-length or "
            "prepare more text (`gptcli prepare --val-ratio` sets the split)"
        )
    check_enough_tokens(splits, context)


def _too_few_windows(settings: TrainSettings, windows: int) -> UsageError:
    options = "--batch-size or --context-length"
    if settings.stride and settings.stride > settings.config.context_length:
        options = f"--stride ({settings.stride}), --batch-size or --context-length"
    return UsageError(
        f"the training split has {windows} windows, fewer than one batch of {settings.batch_size}; lower {options}"
    )


def gradient_norm(model: GPT, clip: float | None) -> float:
    """The global gradient norm, clipped to `clip` when given (a non-finite norm is divergence)."""
    import torch

    if clip:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _diverged(what: str, value: float, step: int, run: RunDirectory) -> GptcliError:
    return GptcliError(
        f"the {what} became {value} at step {step}; stopped without saving ({run.kept()}). "
        "Try a lower --lr, --grad-clip or --warmup-steps", EXIT_NONFINITE,
    )


@dataclass
class _Data:
    """The run's data and the shape of its loop, all checked before anything is written."""

    tokenizer: Any
    train_loader: Any
    val_loader: Any
    sampler: Any
    steps_per_epoch: int
    epochs: float
    total_steps: int
    accumulation: int
    micro: int


def _micro_batches(settings: TrainSettings, dist: Distributed) -> tuple[int, int]:
    """(micro-batches per step, sequences per micro-batch) on each process."""
    per_rank, remainder = divmod(settings.batch_size, dist.world_size)
    if remainder:
        raise UsageError(
            f"--batch-size {settings.batch_size} is not divisible by the {dist.world_size} processes"
        )
    micro = settings.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(
            f"--micro-batch-size {micro} must divide the per-process batch of {per_rank} sequences"
        )
    return per_rank // micro, micro


def _load_data(settings: TrainSettings, dist: Distributed) -> _Data:
    from gptcli.data import BatchLoader, RandomWindowLoader, WindowDataset, is_prepared_dir, load_splits
    from gptcli.tokenizer import get_tokenizer

    config = settings.config
    accumulation, micro = _micro_batches(settings, dist)
    tokenizer = get_tokenizer()
    splits = load_splits(settings.corpus, tokenizer, settings.train_ratio)
    _check_enough_data(splits, settings, is_prepared_dir(settings.corpus))
    if splits.vocab_size and splits.vocab_size > config.vocab_size:
        raise UsageError(
            f"--vocab-size {config.vocab_size} is smaller than the data's vocabulary ({splits.vocab_size}): "
            "its token ids would not fit the embedding"
        )
    stride = settings.stride or config.context_length
    train_loader = BatchLoader(
        WindowDataset(splits.train, config.context_length, stride),
        settings.batch_size, shuffle=True, drop_last=True, rank=dist.rank, world_size=dist.world_size,
    )
    val_loader = BatchLoader(
        WindowDataset(splits.val, config.context_length, stride), settings.batch_size,
        shuffle=False, drop_last=False,
    )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise _too_few_windows(settings, len(train_loader.dataset))
    # Random sampling has no passes: an "epoch" is as many steps as one pass would take (for the
    # per-epoch sample, checkpoint and the plots), and --max-steps alone sets the length.
    random_sampling = settings.sampling == "random"
    sampler = RandomWindowLoader(
        splits.train, config.context_length, settings.batch_size, settings.seed, dist.rank, dist.world_size,
    ) if random_sampling else None
    epochs = math.inf if random_sampling and settings.max_steps else settings.epochs
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps:
        total_steps = settings.max_steps if random_sampling else min(total_steps, settings.max_steps)
    return _Data(tokenizer, train_loader, val_loader, sampler, steps_per_epoch, epochs, total_steps,
                 accumulation, micro)


def train(
    settings: TrainSettings,
    resume: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Iterator[Event]:
    """Run (or, with `resume`, continue) training, yielding events. `stop_requested` is polled
    between optimizer steps; when it returns True the run saves a checkpoint and ends. Under
    torchrun this joins (and finally leaves) the process group."""
    settings.validate()
    dist, device = init_distributed(resolve_device(settings.device))
    try:
        yield from Trainer(settings, dist, device).run(resume, stop_requested)
    finally:
        leave_process_group(dist)


class Trainer:
    """One training process: `setup` (model, optimizer, resumed state, run files), `fit` (epochs of
    `_step`s with `_evaluate` every --eval-freq steps and `_end_epoch` after each pass), `finish`
    (the last checkpoint, plots, the summary), as litgpt's setup -> fit -> validate. Everything the
    run needs is checked before its directory is touched (in `__init__`)."""

    def __init__(self, settings: TrainSettings, dist: Distributed, device: str) -> None:
        self.precision, self.precision_note = resolve_precision(
            settings.precision, device.split(":")[0], settings.strict_precision, option="--precision")
        if self.precision == "bf16" and device.startswith("mps"):
            raise UsageError("--precision bf16 is not supported on mps")
        run_dir = Path(settings.out) if settings.out else default_run_dir(settings.corpus)
        rundir.check_out_path(run_dir)
        self.settings, self.dist, self.device = settings, dist, device
        self.data = _load_data(settings, dist)
        self.directory = RunDirectory(run_dir, settings.keep_checkpoints, dist.is_main)
        self.position = Position()
        self.tokens_per_step = settings.batch_size * settings.config.context_length
        self.last_eval: Evaluation | None = None
        self.reason = "completed"  # how the run ended, for RunFinished

    def run(self, resume: bool, stop_requested: Callable[[], bool]) -> Iterator[Event]:
        """setup -> fit -> finish, with the run directory locked; a new directory is removed again
        when the run fails before its first checkpoint."""
        failed = True
        try:
            resume_from = self.directory.open(resume)
            yield from self.setup(resume, resume_from)
            started, start_tokens = time.perf_counter(), self.position.tokens_seen
            yield from self.fit(stop_requested)
            yield from self.finish(started, start_tokens)
            failed = False
        finally:
            self.directory.close(failed)

    def setup(self, resume: bool, resume_from: Path | None) -> Iterator[Event]:
        import torch

        from gptcli.kernels import set_dropout_rng
        from gptcli.optim import adamw

        settings = self.settings
        torch.manual_seed(settings.seed)
        self.model = build_model(settings, load_init=resume_from is None).to(self.device)
        set_dropout_rng(self.model, settings.dropout_rng)
        # The chapter's optimizer: AdamW over all parameters (torch's fused kernel where it has one).
        self.optimizer = adamw(self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        if resume_from is not None:
            self.position = load_checkpoint(resume_from, self.model, self.optimizer)
            self.directory.saved_step = self.position.steps_done
        elif resume:
            yield Notice(f"{self.directory.path} has no complete checkpoint yet: the run starts again from step 0")
        if self.dist.is_main:
            _start_files(self.directory, settings, self.position)
        self.eager_model = self.train_model = self._wrap_ddp(self.model)
        if settings.compile:
            self.train_model = torch.compile(self.train_model)
        self.position.precision = self.precision
        yield self._started()
        if self.precision_note:
            yield Notice(self.precision_note)

    def _wrap_ddp(self, model: GPT) -> Any:
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.startswith("cuda")
        return DistributedDataParallel(model, device_ids=[self.dist.local_rank] if cuda else None)

    def _started(self) -> RunStarted:
        data, config = self.data, self.settings.config
        return RunStarted(
            out_dir=self.directory.path, device=self.device, config=config,
            parameters=sum(p.numel() for p in self.model.parameters()),
            train_tokens=len(data.train_loader) * self.tokens_per_step,
            val_tokens=len(data.val_loader.dataset) * config.context_length,
            steps_per_epoch=data.steps_per_epoch, total_steps=data.total_steps,
            start_step=self.position.steps_done, world_size=self.dist.world_size, settings=self.settings,
            precision=self.precision,
        )

    def fit(self, stop_requested: Callable[[], bool]) -> Iterator[Event]:
        """Epochs until --epochs (or --max-steps) are done or a stop is requested."""
        position, data = self.position, self.data
        self.model.train()
        while position.epoch < data.epochs and position.steps_done < data.total_steps:
            interrupted = yield from self._epoch(stop_requested)
            if interrupted:
                self.reason = "interrupted"
                return
            if position.batch_in_epoch >= data.steps_per_epoch:
                yield from self._end_epoch()

    def _epoch(self, stop_requested: Callable[[], bool]) -> Generator[Event, None, bool]:
        """The rest of the current epoch's steps; True when it stopped because a stop was requested."""
        position, settings = self.position, self.settings
        for inputs, targets in self._batches():
            if self._stop_agreed(stop_requested()):
                return True
            yield from self._step(inputs, targets)
            if position.steps_done >= self.data.total_steps:
                full_run = self.data.epochs * self.data.steps_per_epoch
                self.reason = "max_steps" if self.data.total_steps < full_run else "completed"
                return False
            if settings.save_every and position.steps_done % settings.save_every == 0:
                yield from self.checkpoint()
        return False

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current epoch's remaining batches (random sampling: as many random windows)."""
        position, data = self.position, self.data
        if data.sampler is not None:
            return data.sampler.batches(position.steps_done, data.steps_per_epoch - position.batch_in_epoch)
        if position.batch_in_epoch == 0:
            position.epoch_seed = data.train_loader.draw_order_seed()
        return data.train_loader.batches(position.epoch_seed, position.batch_in_epoch)

    def _stop_agreed(self, stop: bool) -> bool:
        # Under torchrun every rank must stop at the same step (see all_agree).
        return all_agree(stop, self.device) if self.dist.world_size > 1 else stop

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[Event]:
        """One optimizer step (its micro-batches), then an evaluation every --eval-freq steps."""
        position = self.position
        started = time.perf_counter()
        lr = learning_rate(position.steps_done, self.settings, self.data.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = yield from self._forward_backward(inputs, targets)
        if not math.isfinite(loss):
            raise _diverged("training loss", loss, position.steps_done, self.directory)
        grad_norm = gradient_norm(self.model, self.settings.grad_clip)
        if not math.isfinite(grad_norm):
            raise _diverged("gradient norm", grad_norm, position.steps_done, self.directory)
        self.optimizer.step()
        position.steps_done += 1
        position.batch_in_epoch += 1
        position.tokens_seen += self.tokens_per_step
        step = position.steps_done - 1  # the chapter counts steps from 0
        speed = self.tokens_per_step / (time.perf_counter() - started)
        yield StepDone(position.epoch + 1, step, position.tokens_seen, loss, lr, speed, grad_norm)
        if step % self.settings.eval_freq == 0:
            yield from self._evaluate(step, lr)

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> Generator[Event, None, float]:
        """Gradients of the step's batch, over its micro-batches; the batch's mean loss (over all ranks)."""
        import torch

        accumulation, micro, dist = self.data.accumulation, self.data.micro, self.dist
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        with rank_dropout_rng(self.settings.seed, dist, self.position.steps_done, self.device):
            for m in range(accumulation):
                chunk = slice(m * micro, (m + 1) * micro)
                # Gradients are all-reduced only on the last micro-batch's backward.
                sync = m == accumulation - 1 or dist.world_size == 1
                with (nullcontext() if sync else self.train_model.no_sync()), self._autocast():
                    loss = yield from self._micro_batch_loss(inputs[chunk], targets[chunk])
                loss.backward()
                loss_sum += loss.detach()
        if dist.world_size > 1:
            # The mean over ranks (gloo has no AVG): every rank reports the global batch's loss.
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.SUM)
            loss_sum /= dist.world_size
        return float(loss_sum.item())

    def _micro_batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> Generator[Event, None, torch.Tensor]:
        try:
            return batch_loss(self.train_model, inputs, targets) / self.data.accumulation
        except Exception as exc:
            if self.train_model is self.eager_model:
                raise
            # torch.compile needs a working toolchain; without one, train eagerly.
            self.train_model = self.eager_model
            yield Notice(f"torch.compile failed ({type(exc).__name__}); training without it")
            return batch_loss(self.train_model, inputs, targets) / self.data.accumulation

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            import torch

            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return nullcontext()

    def _evaluate(self, step: int, lr: float) -> Iterator[Event]:
        """The chapter's evaluate_model on rank 0: --eval-iter batches of each split, logged to metrics.jsonl."""
        from gptcli.data import BatchLoader

        # Every rank draws the train loader's order seed, keeping the RNG streams in step; only
        # rank 0 computes the losses (on the global batch size, as a single process would).
        data, settings, position = self.data, self.settings, self.position
        train_seed = data.train_loader.draw_order_seed()
        data.val_loader.draw_order_seed()
        if not self.dist.is_main:
            return
        train_batches = BatchLoader(data.train_loader.dataset, settings.batch_size, True, True).batches(train_seed)
        self.model.eval()
        with self._autocast():
            train_loss = mean_batch_loss(self.model, train_batches, settings.eval_iter, self.device)
            val_loss = mean_batch_loss(self.model, data.val_loader.batches(None), settings.eval_iter, self.device)
        self.model.train()
        self.last_eval = Evaluation(
            epoch=position.epoch + 1, step=step, tokens_seen=position.tokens_seen, train_loss=train_loss,
            val_loss=val_loss, train_ppl=perplexity(train_loss), val_ppl=perplexity(val_loss), lr=lr,
        )
        if position.best_val_loss is None or val_loss < position.best_val_loss:
            position.best_val_loss = val_loss
        with open(self.directory.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(jsonio.dumps(self.last_eval.to_dict()) + "\n")
        yield self.last_eval

    def _end_epoch(self) -> Iterator[Event]:
        """The chapter's sample after each epoch, then a checkpoint (the last one is `finish`'s)."""
        position = self.position
        if self.dist.is_main and self.settings.sample_tokens:
            yield Sample(position.epoch + 1, position.steps_done - 1, self._sample_text())
        position.epoch += 1
        position.batch_in_epoch = 0
        position.epoch_seed = None
        if position.epoch < self.data.epochs:
            yield from self.checkpoint()

    def _sample_text(self) -> str:
        import torch

        from gptcli.generate import generate
        from gptcli.tokenizer import encode

        tokenizer = self.data.tokenizer
        self.model.eval()
        prompt = torch.tensor([encode(tokenizer, self.settings.sample_prompt)], device=self.device)
        new_tokens = generate(self.model, prompt, max_new_tokens=self.settings.sample_tokens, stop_at_eos=False)
        self.model.train()
        return str(tokenizer.decode(prompt[0].tolist() + new_tokens[0]).replace("\n", " "))

    def checkpoint(self) -> Iterator[Event]:
        """Save and commit a checkpoint (rank 0 writes; the other ranks have nothing to save)."""
        if self.dist.is_main:
            yield self.directory.save(self.model, self.optimizer, self.position)

    def finish(self, started: float, start_tokens: int) -> Iterator[Event]:
        """The last checkpoint, the plots, and the run's summary (time and speed since `started`)."""
        yield from self.checkpoint()
        path, position = self.directory.path, self.position
        files = [path / MODEL_FILE, path / METRICS_FILE]
        if self.dist.is_main and self.settings.plots:
            files += write_plots(path, read_metrics(path), self.data.steps_per_epoch)
        seconds, tokens_trained = time.perf_counter() - started, position.tokens_seen - start_tokens
        yield RunFinished(
            reason=self.reason, out_dir=path, steps=position.steps_done, tokens_seen=position.tokens_seen,
            seconds=seconds, tokens_per_second=tokens_trained / seconds if seconds > 0 else 0.0,
            best_val_loss=position.best_val_loss, final=self.last_eval, files=files,
        )
