"""Pretraining: the chapter's `train_model_simple` loop and what its tips add.

`train(settings)` is a generator of events (`gptcli.events`: `RunStarted`, `StepDone`, `Evaluation`,
`Sample`, `CheckpointSaved`, `RunFinished`); it never prints. Defaults reproduce the chapter's run:
AdamW (lr 4e-4, weight decay 0.1), batch 2, evaluation every 5 steps on 5 batches, a greedy 50-token
sample after each epoch, seed 123. Beyond the chapter, all off by default: linear warmup and cosine
decay, gradient clipping, gradient accumulation, bf16 autocast, torch.compile, DDP.

The corpus is a text file or a `gptcli prepare` directory (memory-mapped tokens). `sampling`
"epochs" (the chapter's) passes over all windows in a shuffled order each epoch; "random" draws
every step's windows at random token offsets (nanoGPT-style), for corpora too large for epochs.

Distributed (launched by torchrun, WORLD_SIZE > 1): each rank takes its contiguous share of every
global batch, DistributedDataParallel averages the gradients, and only rank 0 evaluates, samples and
writes. Every rank draws from torch's global RNG exactly what a single process would (data order,
evaluation batches), so shuffling stays in step and rank 0's saved RNG state resumes all of them;
dropout masks come from a generator seeded by (seed, rank, step), different on every rank.

A run directory (`gptcli.rundir`) holds `run.json` (the settings), `metrics.jsonl`, `loss.png`,
`perplexity.png` (`gptcli.plots`) and its checkpoints, each committed atomically: the model, and the
optimizer and RNG states with the position in the data (`gptcli.trainstate`). Resuming restores all
of it, so on CPU a resumed run reproduces an uninterrupted one exactly. A run is locked while it
trains; a diverged run (non-finite loss, gradient or weights) stops with exit code 3 and never saves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import jsonio
from gptcli.data import BatchLoader, load_training_data
from gptcli.distributed import (
    Distributed,
    all_agree,
    check_peers,
    init_distributed,
    leave_process_group,
    rank_dropout_rng,
)
from gptcli.errors import EXIT_NONFINITE, GptcliError, UsageError
from gptcli.evaluate import batch_loss, mean_batch_loss, perplexity
from gptcli.events import CheckpointSaved, Evaluation, Event, Notice, RunFinished, RunStarted, Sample, StepDone
from gptcli.modelfile import MODEL_FILE
from gptcli.plots import write_plots
from gptcli.rundir import METRICS_FILE, RunDirectory, check_out_path, default_run_dir, read_metrics
from gptcli.runtime import resolve_device, resolve_precision
from gptcli.settings import TrainSettings, build_model
from gptcli.trainstate import Position, checkpoint_writers, load_checkpoint

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT


def train(
    settings: TrainSettings,
    resume: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Generator[Event, None, None]:
    """Run (or, with `resume`, continue) training, yielding events. `stop_requested` is polled
    between optimizer steps; when it returns True the run saves a checkpoint and ends. Under
    torchrun this joins (and finally leaves) the process group."""
    settings.validate()
    dist, device = init_distributed(resolve_device(settings.device))
    try:
        yield from Trainer(settings, dist, device).run(resume, stop_requested)
    except RuntimeError as exc:
        check_peers(exc, dist.world_size)
        raise
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
        check_out_path(run_dir)
        self.settings, self.dist, self.device = settings, dist, device
        self.data = load_training_data(settings, dist)
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
            self.directory.start(settings, self.position.steps_done)
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
        """Save and commit a checkpoint (rank 0 writes; the other ranks have nothing to save), never
        of weights that are no longer finite."""
        if not self.dist.is_main:
            return
        step = self.position.steps_done
        if not all(bool(p.isfinite().all()) for p in self.model.parameters()):
            raise GptcliError(
                f"the weights became NaN or infinite by step {step}; stopped without saving "
                f"({self.directory.kept()}). Try a lower --lr, --grad-clip or --warmup-steps", EXIT_NONFINITE,
            )
        step_dir = self.directory.save(step, checkpoint_writers(self.model, self.optimizer, self.position))
        yield CheckpointSaved(step_dir, step)

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


# --- the step's arithmetic ----------------------------------------------------------------------


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
