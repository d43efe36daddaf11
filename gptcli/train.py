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

A run directory holds `model.safetensors`, `trainer.safetensors` (optimizer state and RNG
states), `trainer.json` (step, epoch, position in the data), `run.json` (the settings),
`metrics.jsonl`, `loss.png` and `perplexity.png`. Resuming restores all of it, so on CPU a
resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import __version__
from gptcli.checkpoint import (
    MODEL_FILE,
    atomic_write,
    atomic_write_text,
    load_config,
    load_weights,
    save_model,
    save_tensors,
)
from gptcli.config import GPTConfig
from gptcli.errors import EXIT_NONFINITE, GptcliError, UsageError
from gptcli.evaluate import batch_loss, mean_batch_loss, perplexity
from gptcli.paths import RUNS_DIR
from gptcli.runtime import resolve_device

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT

RUN_FILE = "run.json"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
METRICS_FILE = "metrics.jsonl"


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
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float | None = None
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    train_ratio: float = 0.9
    stride: int | None = None
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    max_steps: int | None = None
    save_every: int | None = None
    init: str | None = None
    plots: bool = True
    sampling: str = "epochs"
    dropout_rng: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["config"] = GPTConfig.from_dict(values["config"])
        return cls(**values)

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "eval_freq", "eval_iter")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "max_steps", "save_every", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise UsageError("--lr must be positive; --min-lr, --weight-decay and --warmup-steps non-negative")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.schedule not in ("constant", "cosine"):
            raise UsageError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.sample_tokens < 0:
            raise UsageError("--sample-tokens must not be negative")
        if self.sampling not in ("epochs", "random"):
            raise UsageError(f"--sampling must be epochs or random, got {self.sampling!r}")
        if self.dropout_rng not in ("exact", "fast"):
            raise UsageError(f"--dropout-rng must be exact or fast, got {self.dropout_rng!r}")


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


@dataclass
class StepDone:
    epoch: int
    step: int
    tokens_seen: int
    loss: float
    lr: float
    tokens_per_second: float


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


# --- devices and distributed --------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} CUDA device(s) on this node; "
                "start at most that many processes per node (or use --device cpu)"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank, local_rank, world_size), device


def all_agree(flag: bool, device: str) -> bool:
    """True on every rank when it is True on any (a stop must happen at the same step everywhere, or
    the ranks that go on wait forever for the others' gradients)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rank_dropout_rng(seed: int, dist: Distributed, step: int, device: str) -> Any:
    """With several ranks: the global RNG, for the forward/backward passes of one step, seeded by
    (seed, rank, step), then restored. Dropout masks then differ between ranks (the same stream on
    every rank would repeat one mask across the ranks' sequences) and do not depend on where a run
    was resumed. A single process keeps the chapter's stream."""
    if dist.world_size == 1 or device.split(":")[0] not in ("cpu", "cuda"):
        return nullcontext()
    import numpy as np
    import torch

    @contextmanager
    def seeded() -> Iterator[None]:
        state = int(np.random.SeedSequence([seed, dist.rank, step]).generate_state(1)[0])
        cuda = device.startswith("cuda")
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.default_generator.manual_seed(state)
            if cuda:
                torch.cuda.manual_seed(state)
            yield

    return seeded()


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


def save_checkpoint(
    run_dir: Path, model: GPT, optimizer: torch.optim.Optimizer, position: Position
) -> None:
    """Trainer state first, the model last; each file atomically. All carry the step, and resume
    refuses files whose steps disagree (a crash between two renames)."""
    tensors, meta = optimizer_tensors(optimizer)
    tensors.update(rng_tensors())
    state = {**dataclasses.asdict(position), "optimizer": meta, "gptcli_version": __version__}
    save_tensors(run_dir / TRAINER_FILE, tensors, {"step": str(position.steps_done)})
    atomic_write_text(run_dir / TRAINER_JSON, json.dumps(state, indent=2) + "\n")
    save_model(run_dir / MODEL_FILE, model, {"step": str(position.steps_done)})


def load_checkpoint(
    run_dir: Path, model: GPT, optimizer: torch.optim.Optimizer
) -> Position:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gptcli.checkpoint import read_metadata

    paths = [run_dir / name for name in (MODEL_FILE, TRAINER_FILE, TRAINER_JSON)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GptcliError(f"cannot resume {run_dir}: no {', '.join(missing)} (no checkpoint was saved)")
    state = json.loads((run_dir / TRAINER_JSON).read_text())
    with safe_open(str(run_dir / TRAINER_FILE), framework="pt") as handle:
        trainer_step = (handle.metadata() or {}).get("step")
    model_step = read_metadata(run_dir / MODEL_FILE).get("step")
    if not (str(state["steps_done"]) == trainer_step == model_step):
        raise GptcliError(
            f"cannot resume {run_dir}: checkpoint files disagree (model step {model_step}, trainer "
            f"step {trainer_step}, trainer.json step {state['steps_done']})"
        )
    load_weights(model, load_file(str(run_dir / MODEL_FILE)), run_dir / MODEL_FILE)
    tensors = load_file(str(run_dir / TRAINER_FILE))
    restore_optimizer(optimizer, tensors, state["optimizer"])
    restore_rng(tensors)
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


def build_model(settings: TrainSettings) -> GPT:
    """A fresh model (seeded before this call), or one started from `settings.init`."""
    from safetensors.torch import load_file

    from gptcli.model import GPT

    model = GPT(settings.config)
    if settings.init:
        load_weights(model, load_file(settings.init), settings.init)
    return model


def resolve_init_config(init: str, overrides: dict[str, Any]) -> GPTConfig:
    """The config of `--init` weights; only the drop rate may differ from them."""
    if not Path(init).is_file():
        raise GptcliError(f"--init weights not found: {init}")
    config = load_config(init)
    conflicting = {
        k: v for k, v in overrides.items() if v is not None and k != "drop_rate" and getattr(config, k) != v
    }
    if conflicting:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in conflicting)
        raise UsageError(f"{names} conflict with the shapes of the --init weights {init}")
    return config.replace(drop_rate=overrides.get("drop_rate"))


def train(
    settings: TrainSettings,
    resume: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Iterator[Event]:
    """Run (or, with `resume`, continue) training, yielding events. `stop_requested` is polled
    between optimizer steps; when it returns True the run saves a checkpoint and ends. Under
    torchrun this joins (and finally leaves) the process group."""
    settings.validate()
    device = resolve_device(settings.device)
    dist, device = init_distributed(device)
    try:
        yield from _train(settings, resume, stop_requested, dist, device)
    finally:
        if dist.world_size > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def _train(
    settings: TrainSettings,
    resume: bool,
    stop_requested: Callable[[], bool],
    dist: Distributed,
    device: str,
) -> Iterator[Event]:
    import torch

    from gptcli.data import BatchLoader, RandomWindowLoader, WindowDataset, check_enough_tokens, load_splits
    from gptcli.kernels import set_dropout_rng
    from gptcli.optim import adamw
    from gptcli.tokenizer import encode, get_tokenizer

    config = settings.config
    device_type = device.split(":")[0]
    if settings.precision == "bf16" and device_type == "mps":
        raise UsageError("--precision bf16 is not supported on mps")

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
    accumulation = per_rank // micro

    run_dir = Path(settings.out) if settings.out else default_run_dir(settings.corpus)
    if not resume and (run_dir / MODEL_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")

    tokenizer = get_tokenizer()
    splits = load_splits(settings.corpus, tokenizer, settings.train_ratio)
    check_enough_tokens(splits, config.context_length)
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
        raise UsageError(
            f"the training split has {len(train_loader.dataset)} windows, fewer than one batch of "
            f"{settings.batch_size}; lower --batch-size or --context-length"
        )
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

    torch.manual_seed(settings.seed)
    model = build_model(settings).to(device)
    set_dropout_rng(model, settings.dropout_rng)  # type: ignore[arg-type]
    # The chapter's optimizer: AdamW over all parameters (torch's fused kernel where it has one).
    optimizer = adamw(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    position = Position()
    if resume:
        position = load_checkpoint(run_dir, model, optimizer)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_FILE, json.dumps(settings.to_dict(), indent=2) + "\n")
        # Evaluations after the last checkpoint are replayed by the resumed run.
        kept = [m for m in read_metrics(run_dir) if m["step"] < position.steps_done]
        atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
        point_latest(run_dir)

    train_model: Any = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device_type == "cuda" else None)
    eager_model = train_model
    if settings.compile:
        train_model = torch.compile(train_model)

    def autocast() -> Any:
        if settings.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(epoch: int, step: int, lr: float) -> Evaluation | None:
        # Every rank draws the train loader's order seed, keeping the RNG streams in step; only
        # rank 0 computes the losses (on the global batch size, as a single process would).
        train_seed = train_loader.draw_order_seed()
        val_loader.draw_order_seed()
        if not dist.is_main:
            return None
        model.eval()
        with autocast():
            train_loss = mean_batch_loss(
                model, BatchLoader(train_loader.dataset, settings.batch_size, True, True).batches(train_seed),
                settings.eval_iter, device,
            )
            val_loss = mean_batch_loss(model, val_loader.batches(None), settings.eval_iter, device)
        model.train()
        return Evaluation(
            epoch=epoch + 1, step=step, tokens_seen=position.tokens_seen, train_loss=train_loss,
            val_loss=val_loss, train_ppl=perplexity(train_loss), val_ppl=perplexity(val_loss), lr=lr,
        )

    def sample_text() -> str:
        from gptcli.generate import generate

        model.eval()
        prompt = torch.tensor([encode(tokenizer, settings.sample_prompt)], device=device)
        new_tokens = generate(model, prompt, max_new_tokens=settings.sample_tokens, stop_at_eos=False)
        model.train()
        return tokenizer.decode(prompt[0].tolist() + new_tokens[0]).replace("\n", " ")

    def checkpoint() -> CheckpointSaved | None:
        if not dist.is_main:
            return None
        save_checkpoint(run_dir, model, optimizer, position)
        return CheckpointSaved(run_dir, position.steps_done)

    tokens_per_step = settings.batch_size * config.context_length
    yield RunStarted(
        out_dir=run_dir, device=device, config=config,
        parameters=sum(p.numel() for p in model.parameters()),
        train_tokens=len(train_loader) * tokens_per_step, val_tokens=len(val_loader.dataset) * config.context_length,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, start_step=position.steps_done,
        world_size=dist.world_size, settings=settings,
    )

    started = time.perf_counter()
    start_tokens = position.tokens_seen
    last_eval: Evaluation | None = None
    reason = "completed"
    model.train()
    while position.epoch < epochs and position.steps_done < total_steps:
        if sampler is not None:
            batches = sampler.batches(position.steps_done, steps_per_epoch - position.batch_in_epoch)
        else:
            if position.batch_in_epoch == 0:
                position.epoch_seed = train_loader.draw_order_seed()
            batches = train_loader.batches(position.epoch_seed, position.batch_in_epoch)
        for inputs, targets in batches:
            stop = stop_requested()
            if dist.world_size > 1:
                stop = all_agree(stop, device)
            if stop:
                reason = "interrupted"
                break
            step_started = time.perf_counter()
            lr = learning_rate(position.steps_done, settings, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            inputs, targets = inputs.to(device), targets.to(device)
            with rank_dropout_rng(settings.seed, dist, position.steps_done, device):
                for m in range(accumulation):
                    chunk = slice(m * micro, (m + 1) * micro)
                    # Gradients are all-reduced only on the last micro-batch's backward.
                    sync = m == accumulation - 1 or dist.world_size == 1
                    with (nullcontext() if sync else train_model.no_sync()), autocast():
                        try:
                            loss = batch_loss(train_model, inputs[chunk], targets[chunk]) / accumulation
                        except Exception as exc:
                            if train_model is eager_model:
                                raise
                            # torch.compile needs a working toolchain; without one, train eagerly.
                            train_model = eager_model
                            yield Notice(f"torch.compile failed ({type(exc).__name__}); training without it")
                            loss = batch_loss(train_model, inputs[chunk], targets[chunk]) / accumulation
                    loss.backward()
                    loss_sum += loss.detach()
            if dist.world_size > 1:
                # The mean over ranks (gloo has no AVG): every rank reports the global batch's loss.
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.SUM)
                loss_sum /= dist.world_size
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise GptcliError(
                    f"the training loss became {loss_value} at step {position.steps_done}; stopped without "
                    "saving (the last checkpoint is kept). Try a lower --lr, --grad-clip or --warmup-steps",
                    EXIT_NONFINITE,
                )
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            position.steps_done += 1
            position.batch_in_epoch += 1
            position.tokens_seen += tokens_per_step
            step = position.steps_done - 1  # the chapter counts steps from 0
            elapsed = time.perf_counter() - step_started
            yield StepDone(position.epoch + 1, step, position.tokens_seen, loss_value, lr, tokens_per_step / elapsed)

            if step % settings.eval_freq == 0:
                evaluation = evaluate(position.epoch, step, lr)
                if evaluation is not None:
                    last_eval = evaluation
                    if position.best_val_loss is None or last_eval.val_loss < position.best_val_loss:
                        position.best_val_loss = last_eval.val_loss
                    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(last_eval.to_dict()) + "\n")
                    yield last_eval
            if position.steps_done >= total_steps:
                reason = "max_steps" if total_steps < epochs * steps_per_epoch else "completed"
                break
            if settings.save_every and position.steps_done % settings.save_every == 0:
                saved = checkpoint()
                if saved:
                    yield saved
        if reason == "interrupted":
            break
        if position.batch_in_epoch >= steps_per_epoch:
            if dist.is_main and settings.sample_tokens:
                yield Sample(position.epoch + 1, position.steps_done - 1, sample_text())
            position.epoch += 1
            position.batch_in_epoch = 0
            position.epoch_seed = None
            if position.epoch < epochs:
                saved = checkpoint()
                if saved:
                    yield saved
        if reason != "completed":
            break

    saved = checkpoint()
    if saved:
        yield saved
    files = [run_dir / MODEL_FILE, run_dir / TRAINER_FILE, run_dir / METRICS_FILE]
    if dist.is_main and settings.plots:
        files += write_plots(run_dir, read_metrics(run_dir), steps_per_epoch)
    seconds = time.perf_counter() - started
    trained = position.tokens_seen - start_tokens
    yield RunFinished(
        reason=reason, out_dir=run_dir, steps=position.steps_done, tokens_seen=position.tokens_seen,
        seconds=seconds, tokens_per_second=trained / seconds if seconds > 0 else 0.0,
        best_val_loss=position.best_val_loss, final=last_eval, files=files,
    )
