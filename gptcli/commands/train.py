"""Pretrain a GPT from scratch on a text file (or a `gptcli prepare` directory), as the chapter does.

Ctrl-C or SIGTERM: save a checkpoint and exit 130 or 143 (continue with --resume RUN).

Exit code 3: the loss diverged; nothing was saved."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gptcli.choices import LOGGERS
from gptcli.commands._options import typed_options, typer_options
from gptcli.limits import OVERRIDE
from gptcli.options import argument, option
from gptcli.settings import LOOP, RUNTIME, ModelOptions, TrainOptions

if TYPE_CHECKING:
    from gptcli.events import Event
    from gptcli.settings import TrainSettings
    from gptcli.ui import TrainView


def _check_loggers(values: list[str] | None) -> list[str]:
    """--logger's choices (typer takes no list of Literal values): a usage error as typer's own."""
    for value in values or []:
        if value not in LOGGERS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, LOGGERS))}.")
    return values or []


TRAIN_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainOptions))


@dataclass
class CommandOptions:
    """The corpus and the run directory (resolved into the run's settings), and what steers only this
    process: not settings of the run (not in run.json), so free to change on --resume."""

    corpus: str | None = argument(
        None, "UTF-8 text file, or a directory made by `gptcli prepare`. Default: the chapter's the-verdict.txt, "
        "bundled with gptcli (no download).",
    )
    out: Path | None = option(None, "Run directory (default: runs/<time>-<corpus>).", LOOP)
    resume: Path | None = option(
        None, "Continue the run in this directory where it stopped (--epochs/--max-steps may extend it; the run's "
        "other options may be repeated unchanged).", LOOP,
    )
    threads: int | None = option(
        None, "CPU threads for torch per process (default: one per core; under --nproc, cores / processes).",
        RUNTIME, flags=("--threads",), show_default=False,
    )
    nproc: int | None = option(
        None, "Train with this many local processes (DDP, launched through torch's own launcher, torchrun).", RUNTIME,
    )
    logger: list[str] | None = option(
        None, "Also log to an experiment tracker; repeatable (--logger tensorboard --logger csv). Each evaluation as "
        "in metrics.jsonl, each step's loss, lr, tokens/s and gradient norm, each epoch's sample. tensorboard: "
        "RUN/tensorboard/ (needs the tensorboard extra of gptcli); wandb: RUN/wandb/, offline unless WANDB_API_KEY "
        "or WANDB_MODE is set (needs the wandb extra); csv: RUN/metrics.csv and RUN/steps.csv. May change on "
        "--resume, which continues the same logs.", RUNTIME,
        flags=("--logger",), show_default=False, metavar=f"[{'|'.join(LOGGERS)}]", callback=_check_loggers,
    )
    json_output: bool = option(False, "One JSON object per evaluation on stdout (and nothing else there).", RUNTIME,
                               flags=("--json",))
    quiet: bool = option(False, "No progress or tables on stderr.", RUNTIME, flags=("--quiet", "-q"))
    ignore_memory_check: bool = option(
        False, "Train even when the estimate of the memory training needs (weights, gradients, AdamW's state, "
        "activations) is more than this machine has available.", RUNTIME, flags=(OVERRIDE,),
    )


@typer_options
def command(ctx: typer.Context, model: ModelOptions, options: TrainOptions, cli: CommandOptions) -> None:
    from gptcli.errors import UsageError

    if cli.corpus == "-":
        raise UsageError("train does not read stdin (it passes over the text many times); save the text to a "
                         "file, or tokenize it with `gptcli prepare - --out DIR` and train on DIR")
    loggers = list(cli.logger or [])
    if loggers:  # a missing extra stops here, before anything is read or written
        from gptcli.loggers import check_available

        check_available(loggers)
    if cli.nproc is not None:
        from gptcli.distributed import launch

        raise typer.Exit(launch(cli.nproc, sys.argv))
    main_rank = _rank() == 0
    # Under torchrun only rank 0 prints.
    quiet, json_output = (cli.quiet, cli.json_output) if main_rank else (True, False)
    with _errors_on_rank_zero_only():
        from gptcli.runtime import set_threads

        set_threads(cli.threads)
        typed = typed_options(ctx)
        if cli.resume is not None:
            settings = _resumed(cli.resume, cli, model, options, typed)
        else:
            settings = _new_settings(cli, model, options, typed)
        _check_memory(settings, cli.ignore_memory_check)
        _train(settings, cli.resume is not None, quiet, json_output, main_rank, loggers)


def _check_memory(settings: TrainSettings, ignore: bool) -> None:
    """What cannot fit is refused before the model is built and the run directory created (the
    estimate is per process: each one holds the model and its micro-batch's activations)."""
    from gptcli.config import parameter_counts
    from gptcli.limits import check_memory, training_bytes

    config = settings.config
    micro = settings.micro_batch_size or max(1, settings.batch_size // int(os.environ.get("WORLD_SIZE", "1")))
    parameters = parameter_counts(config)["total"]
    check_memory(training_bytes(config, micro), f"training this model ({parameters:,} parameters, "
                 f"{micro} sequence(s) of {config.context_length} tokens per pass)", ignore)


def _rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def _errors_on_rank_zero_only() -> Iterator[None]:
    """Under torchrun every rank meets the same bad option or input: rank 0 says it, once. A rank
    that died is the launcher's to report: the survivors say nothing."""
    from gptcli.errors import GptcliError

    try:
        yield
    except GptcliError as exc:
        from gptcli.distributed import PeerLost

        if _rank() != 0 or isinstance(exc, PeerLost):
            raise typer.Exit(exc.exit_code) from None
        raise


def _new_settings(cli: CommandOptions, model: ModelOptions, options: TrainOptions,
                  typed: Sequence[str]) -> TrainSettings:
    """The settings of a new run from the command line, validated before anything is written."""
    from gptcli.errors import UsageError
    from gptcli.settings import TrainSettings, resolve_init_path

    config = model.config(typed)
    init = str(resolve_init_path(model.init)) if model.init is not None else None
    if cli.corpus is not None and Path(cli.corpus).is_dir() and "train_ratio" in typed:
        raise UsageError("--train-ratio does not apply to prepared data: its split was fixed by "
                         "`gptcli prepare --val-ratio`")
    out = str(cli.out) if cli.out else None
    settings = TrainSettings.of(options, corpus=cli.corpus or "", config=config, out=out, init=init)
    settings.validate()
    if cli.corpus is None:
        from gptcli.assets import VERDICT

        settings.corpus = str(VERDICT)
    return settings


def _resumed(resume: Path, cli: CommandOptions, model: ModelOptions, options: TrainOptions,
             typed: Sequence[str]) -> TrainSettings:
    """The run's stored settings, with the options typed again checked against them."""
    from gptcli.errors import UsageError
    from gptcli.settings import TrainSettings, resumed_settings

    try:
        settings = TrainSettings.from_file(resume)
    except UsageError as exc:
        raise UsageError(f"--resume {exc.message}; it cannot be resumed") from None
    implied = model.preset_shape(typed)
    if cli.out is not None and os.path.realpath(cli.out) != os.path.realpath(resume):
        raise UsageError(f"--out {cli.out} is not the run being resumed ({resume}); drop --out or make it the same")
    settings = resumed_settings(settings, [*_typed_again(typed, cli, model, options), *implied])
    settings.out = str(resume)
    settings.validate()
    return settings


def _typed_again(typed: Sequence[str], cli: CommandOptions, model: ModelOptions,
                 options: TrainOptions) -> list[tuple[str, object]]:
    """The settings of the run typed again on --resume, as (setting, value) in the order typed; not
    --preset (see `preset_shape`), --out (checked apart) or what steers only this process."""
    from gptcli.settings import SHAPE, resolve_init_path

    given: list[tuple[str, object]] = []
    for name in typed:
        if name == "corpus" and cli.corpus is not None:
            given.append((name, cli.corpus))
        elif name == "init" and model.init is not None:
            given.append((name, str(resolve_init_path(model.init))))
        elif name in SHAPE:
            given.append((name, getattr(model, name)))
        elif name in TRAIN_OPTIONS:
            given.append((name, getattr(options, name)))
    return given


class _StopSignals:
    """The one stop policy of `train`. SIGINT, SIGTERM, SIGHUP (the terminal closed) or losing stdout
    (`stdout_lost`: a reader that left, `| head -1`) once training has started: finish the step,
    save a checkpoint, exit 128 + the signal (130, 143, 129; 141 for a closed pipe). Before it has
    started (the data read, the model built, a checkpoint loaded): abort at once, nothing
    half-written. A second signal: abort at once, keeping what was committed. Under torchrun a
    signal reaches each process twice (from the terminal, then forwarded by the launcher): a repeat
    within a second is that echo, not a second signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, announce: bool) -> None:
        self.requested: int | None = None  # the signal (SIGPIPE for a lost stdout)
        self.why = "interrupted"
        self.code: int | None = None
        self.at = 0.0
        self.started = False  # the first step is under way: a stop saves a checkpoint
        self.aborting = False
        self.announce = announce
        self.echo_window = 1.0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.aborting or (self.requested is not None and time.monotonic() - self.at < self.echo_window):
            return  # already aborting (let the cleanup finish), or the launcher's echo
        if self.requested is not None or not self.started:
            self.requested = self.requested or signum
            self.aborting = True
            raise KeyboardInterrupt
        again = "Ctrl-C" if signum == signal.SIGINT else "a second signal"
        self._request(signum, "interrupted", f"stopping after this step and saving a checkpoint ({again} to abort)")

    def stdout_lost(self, exc: Exception) -> None:
        """Writing an event to stdout failed: stop writing there, and stop as for a signal (exit 141
        for a reader that left; 1 for any other failure, saying it)."""
        from gptcli import stdio

        stdio.silence_stdout()  # what is still buffered goes nowhere, without failing again
        why = "stdout was closed" if isinstance(exc, BrokenPipeError) else getattr(exc, "message", str(exc))
        if self._request(signal.SIGPIPE, why, f"{why}: stopping after this step and saving a checkpoint"):
            self.code = None if isinstance(exc, BrokenPipeError) else getattr(exc, "exit_code", 1)

    def _request(self, signum: int, why: str, notice: str) -> bool:
        """The first stop request counts (True); later ones change nothing."""
        from gptcli import ui

        if self.requested is not None:
            return False
        self.requested, self.why, self.at = signum, why, time.monotonic()
        if self.announce:
            ui.console.print(f"[yellow]{notice}")
        return True

    def exit_code(self) -> int:
        if self.code is not None:
            return self.code
        return 128 + (self.requested or signal.SIGINT)


def _show(view: TrainView, event: Event, json_output: bool, stop: _StopSignals) -> bool:
    """One training event on the progress view (and an evaluation as a JSON line on stdout with
    --json); whether stdout still takes JSON lines (losing it is a stop request, never a lost run)."""
    from gptcli import jsonio
    from gptcli.events import Evaluation, Notice, RunStarted, Sample, StepDone
    from gptcli.stdio import StdoutError

    if isinstance(event, StepDone):
        view.step(event.epoch, event.step + 1, event.loss, event.tokens_per_second)
    elif isinstance(event, Evaluation):
        view.evaluation(event)
        if json_output:
            try:
                typer.echo(jsonio.dumps(event.to_dict()))
            except (BrokenPipeError, StdoutError) as exc:
                stop.stdout_lost(exc)
                return False
    elif isinstance(event, Notice):
        view.message(f"[yellow]{event.text}")
    elif isinstance(event, Sample):
        view.message(f"[dim]epoch {event.epoch} sample:[/] {event.text}")
    elif isinstance(event, RunStarted):
        stop.started = True
        view.start(event)
    return json_output


def _train(
    settings: TrainSettings, resume: bool, quiet: bool, json_output: bool, main_rank: bool, loggers: Sequence[str]
) -> None:
    """Run training, showing its events and feeding them to the experiment `loggers` (under torchrun
    rank 0's only). The loggers close after the summary, even when the run fails."""
    from gptcli import ui
    from gptcli.errors import GptcliError
    from gptcli.events import RunFinished, RunStarted
    from gptcli.loggers import Loggers
    from gptcli.rundir import kept_after_stop
    from gptcli.train import train

    view = ui.TrainView(quiet=quiet)
    finished: RunFinished | None = None
    out = Path(settings.out) if resume and settings.out else None  # a new run's: known once it starts
    sinks = Loggers(loggers if main_rank else [], quiet=quiet)
    with _StopSignals(announce=main_rank) as stop, closing(sinks):
        try:
            with closing(train(settings, resume=resume, stop_requested=lambda: stop.requested is not None)) as run:
                for event in run:
                    sinks.handle(event)
                    if isinstance(event, RunFinished):
                        finished = event
                        finished.files += sinks.files
                    else:
                        out = event.out_dir if isinstance(event, RunStarted) else out
                        json_output = _show(view, event, json_output, stop)
        except KeyboardInterrupt:  # the run's generator is closed: the directory is as it stays
            what = "aborted" if stop.started else "stopped before training started"
            raise GptcliError(f"{what}; {kept_after_stop(out)}", stop.exit_code()) from None
        finally:
            view.finish(finished)
    if finished is not None and finished.reason == "interrupted":
        if main_rank:
            ui.console.print(f"{stop.why}; continue with: gptcli train --resume {finished.out_dir}")
        raise typer.Exit(stop.exit_code())
