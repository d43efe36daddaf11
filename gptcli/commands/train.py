"""Pretrain a GPT from scratch on a text file (or a `gptcli prepare` directory), as the chapter does.

Ctrl-C or SIGTERM: save a checkpoint and exit 130 or 143 (continue with --resume RUN).

Exit code 3: the loss diverged; nothing was saved."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import typer

from gptcli.config import PRESETS
from gptcli.settings import DEFAULT_PRESET, DEFAULTS, LOGGERS, Device, DropoutRng, Precision, Sampling, Schedule

D = DEFAULTS  # every default below is the settings' own

MODEL = "Model shape"
DATA = "Data"
OPTIM = "Optimization"
LOOP = "Evaluation, samples and checkpoints"
RUNTIME = "Runtime and output"

# Options that only steer this process (not settings of the run): free on --resume.
RUNTIME_OPTIONS = {"json_output", "quiet", "resume", "threads", "nproc", "logger"}
MODEL_OPTIONS = ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "vocab_size",
                 "tie_weights")


def _rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def _errors_on_rank_zero_only() -> Iterator[None]:
    """Under torchrun every rank meets the same bad option or input: rank 0 says it, once."""
    from gptcli.errors import GptcliError

    try:
        yield
    except GptcliError as exc:
        if _rank() != 0:
            raise typer.Exit(exc.exit_code) from None
        raise


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was typed on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _check_loggers(values: list[str] | None) -> list[str]:
    """--logger's choices (typer takes no list of Literal values): a usage error as typer's own."""
    for value in values or []:
        if value not in LOGGERS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, LOGGERS))}.")
    return values or []


def command(
    ctx: typer.Context,
    corpus: str | None = typer.Argument(
        None, help="UTF-8 text file, or a directory made by `gptcli prepare`. Default: the chapter's "
        "the-verdict.txt, bundled with gptcli (no download).", show_default=False,
    ),
    preset: str = typer.Option(
        DEFAULT_PRESET, help=f"Model shape preset: {', '.join(PRESETS)} (aliases gpt2, gpt2-small, gpt2-medium, "
        "gpt2-large, gpt2-xl).", rich_help_panel=MODEL,
    ),
    context_length: int = typer.Option(
        D.config.context_length, help="Tokens per training window (the chapter's 256; GPT-2 was trained with 1024).",
        rich_help_panel=MODEL,
    ),
    emb_dim: int | None = typer.Option(None, help="Embedding width (default: preset's)", rich_help_panel=MODEL),
    n_heads: int | None = typer.Option(None, help="Attention heads (default: preset's)", rich_help_panel=MODEL),
    n_layers: int | None = typer.Option(None, help="Transformer blocks (default: preset's)", rich_help_panel=MODEL),
    drop_rate: float = typer.Option(D.config.drop_rate, help="Dropout rate.", rich_help_panel=MODEL),
    qkv_bias: bool = typer.Option(
        D.config.qkv_bias, help="Bias in the query/key/value projections.", rich_help_panel=MODEL,
    ),
    vocab_size: int = typer.Option(
        D.config.vocab_size, help="Vocabulary size (GPT-2 BPE: 50257).", rich_help_panel=MODEL,
    ),
    tie_weights: bool = typer.Option(
        D.config.tie_weights, help="Share the output head with the token embedding (GPT-2 does; the chapter does not).",
        rich_help_panel=MODEL,
    ),
    init: Path | None = typer.Option(
        None, help="Start from saved weights (.safetensors from a run or `gptcli convert`, or a run "
        "directory); the model shape comes from them.", rich_help_panel=MODEL,
    ),
    train_ratio: float = typer.Option(D.train_ratio, help="Share of the text (by characters) used for training.",
                                      rich_help_panel=DATA),
    stride: int | None = typer.Option(D.stride, help="Step between windows (default: context length).",
                                      rich_help_panel=DATA),
    sampling: Sampling = typer.Option(
        D.sampling, help="epochs: shuffled passes over all windows (the chapter's); random: every step draws "
        "windows at random token offsets (nanoGPT-style; with --max-steps, that alone sets the length).",
        rich_help_panel=DATA,
    ),
    epochs: int = typer.Option(D.epochs, help="Passes over the training windows.", rich_help_panel=OPTIM),
    batch_size: int = typer.Option(
        D.batch_size, help="Sequences per optimizer step (summed over processes and accumulation micro-batches).",
        rich_help_panel=OPTIM,
    ),
    micro_batch_size: int | None = typer.Option(
        D.micro_batch_size, rich_help_panel=OPTIM,
        help="Sequences per forward/backward pass; smaller than the per-process batch means gradient "
        "accumulation (default: the whole batch).",
    ),
    lr: float = typer.Option(D.lr, help="Peak learning rate (AdamW).", rich_help_panel=OPTIM),
    weight_decay: float = typer.Option(D.weight_decay, help="AdamW weight decay.", rich_help_panel=OPTIM),
    schedule: Schedule = typer.Option(D.schedule, help="Learning-rate schedule after warmup.",
                                 rich_help_panel=OPTIM),
    warmup_steps: int = typer.Option(
        D.warmup_steps, help="Linear warmup steps (lr/warmup up to --lr).", rich_help_panel=OPTIM,
    ),
    min_lr: float = typer.Option(D.min_lr, help="Final learning rate of the cosine decay.", rich_help_panel=OPTIM),
    grad_clip: float | None = typer.Option(D.grad_clip, help="Clip the gradient norm to this value (default: off).",
                                           rich_help_panel=OPTIM),
    max_steps: int | None = typer.Option(
        D.max_steps, help="Stop after this many optimizer steps.", rich_help_panel=OPTIM,
    ),
    seed: int = typer.Option(D.seed, help="Random seed (initialisation, shuffling, dropout).", rich_help_panel=OPTIM),
    eval_freq: int = typer.Option(D.eval_freq, help="Evaluate every this many steps.", rich_help_panel=LOOP),
    eval_iter: int = typer.Option(D.eval_iter, help="Batches per evaluation (train and val).", rich_help_panel=LOOP),
    sample_prompt: str = typer.Option(D.sample_prompt, help="Prompt of the sample after each epoch.",
                                      rich_help_panel=LOOP),
    sample_tokens: int = typer.Option(D.sample_tokens, help="Tokens in each epoch's greedy sample (0: none).",
                                      rich_help_panel=LOOP),
    save_every: int | None = typer.Option(
        D.save_every, help="Also checkpoint every this many steps (default: after each epoch and at the end).",
        rich_help_panel=LOOP,
    ),
    keep_checkpoints: int = typer.Option(
        D.keep_checkpoints, help="Checkpoints kept in RUN/checkpoints (the newest ones; each is committed atomically).",
        rich_help_panel=LOOP,
    ),
    out: Path | None = typer.Option(None, help="Run directory (default: runs/<time>-<corpus>).",
                                    rich_help_panel=LOOP),
    resume: Path | None = typer.Option(
        None, help="Continue the run in this directory where it stopped (--epochs/--max-steps may extend it; "
        "the run's other options may be repeated unchanged).",
        rich_help_panel=LOOP,
    ),
    plots: bool = typer.Option(D.plots, help="Write loss.png and perplexity.png.", rich_help_panel=LOOP),
    device: Device = typer.Option(D.device, help="auto: cuda, then mps, then cpu.",
                               rich_help_panel=RUNTIME),
    precision: Precision = typer.Option(
        D.precision, rich_help_panel=RUNTIME,
        help="fp32 (the chapter's, exact); bf16 autocast; auto: bf16 on CUDA with bf16 and on CPUs with native bf16 "
        "(AVX512_BF16, AMX), else fp32. bf16 where it is not native runs fp32 with a note (it would be slower).",
    ),
    strict_precision: bool = typer.Option(
        D.strict_precision, "--strict-precision", rich_help_panel=RUNTIME,
        help="Refuse (exit 2) instead of running fp32 when bf16 is not native here.",
    ),
    compile: bool = typer.Option(D.compile, "--compile", help="torch.compile the model.", rich_help_panel=RUNTIME),
    dropout_rng: DropoutRng = typer.Option(
        D.dropout_rng, help="exact: dropout masks are torch's own (nn.Dropout's, so a seeded run reproduces the "
        "chapter's numbers); fast: cheaper masks from another random stream (about 2x faster to draw, a few "
        "percent of a CPU training step; the same rate, other numbers than the book's). GPTCLI_KERNELS=0 "
        "turns gptcli's kernels off and uses torch's dropout.", rich_help_panel=RUNTIME,
    ),
    threads: int | None = typer.Option(
        None, "--threads", show_default=False, rich_help_panel=RUNTIME,
        help="CPU threads for torch per process (default: one per core; under --nproc, cores / processes).",
    ),
    nproc: int | None = typer.Option(
        None, help="Train with this many local processes (DDP, launched through torch's own launcher, "
        "torchrun).", rich_help_panel=RUNTIME,
    ),
    logger: list[str] | None = typer.Option(
        None, "--logger", show_default=False, rich_help_panel=RUNTIME, metavar=f"[{'|'.join(LOGGERS)}]",
        callback=_check_loggers,
        help="Also log to an experiment tracker; repeatable (--logger tensorboard --logger csv). Each evaluation as "
        "in metrics.jsonl, each step's loss, lr, tokens/s and gradient norm, each epoch's sample. tensorboard: "
        "RUN/tensorboard/ (needs the tensorboard extra of gptcli); wandb: RUN/wandb/, offline unless WANDB_API_KEY "
        "or WANDB_MODE is set (needs the wandb extra); csv: RUN/metrics.csv and RUN/steps.csv. May change on "
        "--resume, which continues the same logs.",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="One JSON object per evaluation on stdout (and nothing else there).",
        rich_help_panel=RUNTIME,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or tables on stderr.",
                               rich_help_panel=RUNTIME),
) -> None:
    from gptcli.errors import UsageError

    if corpus == "-":
        raise UsageError("train does not read stdin (it passes over the text many times); save the text to a "
                         "file, or tokenize it with `gptcli prepare - --out DIR` and train on DIR")
    loggers = list(logger or [])
    if loggers:  # a missing extra stops here, before anything is read or written
        from gptcli.loggers import check_available

        check_available(loggers)
    if nproc is not None:
        from gptcli.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv))
    main_rank = _rank() == 0
    if not main_rank:  # under torchrun only rank 0 prints
        quiet, json_output = True, False
    with _errors_on_rank_zero_only():
        from gptcli.runtime import set_threads

        set_threads(threads)
        settings = _resumed(ctx, resume) if resume is not None else _new_settings(ctx)
        _train(settings, resume is not None, quiet, json_output, main_rank, loggers)


def _resumed(ctx: typer.Context, resume: Path) -> Any:
    """The run's stored settings, with the options given again checked against them."""
    from gptcli.config import get_preset
    from gptcli.errors import UsageError
    from gptcli.settings import TrainSettings, resumed_settings
    from gptcli.train import resolve_init_path

    try:
        settings = TrainSettings.from_file(resume)
    except UsageError as exc:
        raise UsageError(f"--resume {exc.message}; it cannot be resumed") from None
    given = {name: value for name, value in ctx.params.items()
             if name not in RUNTIME_OPTIONS | {"preset"} and _given(ctx, name)}
    if _given(ctx, "preset"):  # the preset stands for the shape fields not given one by one
        preset = get_preset(ctx.params["preset"])
        for name in ("emb_dim", "n_heads", "n_layers"):
            given.setdefault(name, getattr(preset, name))
    out = given.pop("out", None)
    if out is not None and os.path.realpath(out) != os.path.realpath(resume):
        raise UsageError(f"--out {out} is not the run being resumed ({resume}); drop --out or make it the same")
    for name in ("corpus", "init"):
        if given.get(name) is not None:
            given[name] = str(resolve_init_path(given[name]) if name == "init" else given[name])
    settings = resumed_settings(settings, given)
    settings.out = str(resume)
    settings.validate()
    return settings


def _new_settings(ctx: typer.Context) -> Any:
    """The settings of a new run from the command line, validated before anything is written."""
    from gptcli.config import get_preset
    from gptcli.errors import UsageError
    from gptcli.settings import TrainSettings
    from gptcli.train import resolve_init_config, resolve_init_path

    params = ctx.params
    overrides: dict[str, Any] = {name: params[name] for name in MODEL_OPTIONS}
    init = params["init"]
    if init is not None:
        config = resolve_init_config(str(init), {k: v for k, v in overrides.items() if _given(ctx, k)})
        init = str(resolve_init_path(init))
    else:
        config = get_preset(params["preset"]).replace(**overrides)
    corpus = params["corpus"]
    if corpus is not None and Path(corpus).is_dir() and _given(ctx, "train_ratio"):
        raise UsageError("--train-ratio does not apply to prepared data: its split was fixed by "
                         "`gptcli prepare --val-ratio`")
    fields = {name: params[name] for name in params
              if name not in RUNTIME_OPTIONS | {"preset", "corpus", "init", "out", *MODEL_OPTIONS}}
    settings = TrainSettings(corpus=corpus or "", config=config, out=str(params["out"]) if params["out"] else None,
                             init=init, **fields)
    settings.validate()
    if corpus is None:
        from gptcli.assets import VERDICT

        settings.corpus = str(VERDICT)
    return settings


class _StopSignals:
    """First SIGINT or SIGTERM: finish the step, checkpoint, exit 130 or 143. A second: abort at
    once. Under torchrun a signal reaches each process twice (from the terminal, then forwarded by
    the launcher): a repeat within a second is that echo, not a second signal."""

    def __init__(self, announce: bool) -> None:
        self.requested: int | None = None
        self.at = 0.0
        self.announce = announce
        self.echo_window = 1.0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        from gptcli import ui

        if self.requested is not None:
            if time.monotonic() - self.at < self.echo_window:
                return
            raise KeyboardInterrupt
        self.requested, self.at = signum, time.monotonic()
        if self.announce:
            again = "Ctrl-C" if signum == signal.SIGINT else "a second signal"
            ui.console.print(f"[yellow]stopping after this step and saving a checkpoint ({again} to abort)")

    def exit_code(self) -> int:
        from gptcli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

        return EXIT_TERMINATED if self.requested == signal.SIGTERM else EXIT_INTERRUPTED


def _show(view: Any, event: Any, json_output: bool) -> None:
    """One training event on the progress view (and an evaluation as a JSON line on stdout with --json)."""
    from gptcli import jsonio
    from gptcli.train import Evaluation, Notice, RunStarted, Sample, StepDone

    if isinstance(event, StepDone):
        view.step(event.epoch, event.step + 1, event.loss, event.tokens_per_second)
    elif isinstance(event, Evaluation):
        view.evaluation(event)
        if json_output:
            typer.echo(jsonio.dumps(event.to_dict()))
    elif isinstance(event, Notice):
        view.message(f"[yellow]{event.text}")
    elif isinstance(event, Sample):
        view.message(f"[dim]epoch {event.epoch} sample:[/] {event.text}")
    elif isinstance(event, RunStarted):
        view.start(event)


def _train(
    settings: Any, resume: bool, quiet: bool, json_output: bool, main_rank: bool, loggers: Sequence[str]
) -> None:
    """Run training, showing its events and feeding them to the experiment `loggers` (under torchrun
    rank 0's only). The loggers close after the summary, even when the run fails."""
    from gptcli import ui
    from gptcli.errors import GptcliError
    from gptcli.loggers import Loggers
    from gptcli.train import RunFinished, train

    view = ui.TrainView(quiet=quiet)
    finished: RunFinished | None = None
    sinks = Loggers(loggers if main_rank else [], quiet=quiet)
    with _StopSignals(announce=main_rank) as stop, closing(sinks):
        try:
            for event in train(settings, resume=resume, stop_requested=lambda: stop.requested is not None):
                sinks.handle(event)
                if isinstance(event, RunFinished):
                    finished = event
                    finished.files += sinks.files
                else:
                    _show(view, event, json_output)
        except KeyboardInterrupt:
            raise GptcliError("aborted; the last committed checkpoint is kept", stop.exit_code()) from None
        finally:
            view.finish(finished)
    if finished is not None and finished.reason == "interrupted":
        if main_rank:
            ui.console.print(f"interrupted; continue with: gptcli train --resume {finished.out_dir}")
        raise typer.Exit(stop.exit_code())
