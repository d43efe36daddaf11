"""Experiment loggers for `gptcli train --logger`: TensorBoard, Weights & Biases and CSV.

Training's core yields events and never logs; the `train` command feeds every event to `Loggers`,
which opens the chosen sinks on `RunStarted` (on rank 0 only) and closes them at the end. A sink
logs each evaluation as metrics.jsonl has it (under `eval/`, at the evaluation's step), each
optimizer step's loss, lr, tokens/s and gradient norm (under `train/`), and each epoch's sample as
text. Everything goes inside the run directory:

    RUN/tensorboard/                  TensorBoard event files (torch's SummaryWriter)
    RUN/wandb/  RUN/wandb-run-id      W&B's run directory, and the run's id for --resume
    RUN/metrics.csv  RUN/steps.csv    evaluations (metrics.jsonl's columns), and per-step scalars

A resumed run starts again at its checkpoint's step, so each sink drops or hides what the stopped
process logged after that checkpoint: TensorBoard through `purge_step`, CSV by rewriting its files,
W&B by skipping the steps it already has. The libraries are optional extras, imported only when a
sink opens (`gptcli --help` stays instant); `check_available` finds them without importing.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.util
import io
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Protocol

from gptcli import jsonio
from gptcli.durable import atomic_write_text
from gptcli.errors import GptcliError, UsageError
from gptcli.events import CheckpointSaved, Evaluation, Event, RunStarted, Sample, StepDone
from gptcli.rundir import read_metrics

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
METRICS_CSV = "metrics.csv"
STEPS_CSV = "steps.csv"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the extra each logger needs (csv: none)
EVAL_COLUMNS = [f.name for f in dataclasses.fields(Evaluation)]
STEP_COLUMNS = [f.name for f in dataclasses.fields(StepDone)]


def check_available(kinds: Iterable[str]) -> None:
    """A usage error naming the pip extra when a logger's library is not installed. find_spec
    looks without importing, so this is cheap enough to run before anything else."""
    for kind in kinds:
        package = PACKAGES.get(kind)
        if package is not None and importlib.util.find_spec(package) is None:
            raise UsageError(f"--logger {kind} needs the {package} package: pip install 'gptcli[{kind}]'")


def eval_scalars(event: Evaluation) -> dict[str, float]:
    """An evaluation's values, named as in metrics.jsonl (the step is the x axis)."""
    return {f"eval/{key}": float(value) for key, value in event.to_dict().items() if key != "step"}


def step_scalars(event: StepDone) -> dict[str, float]:
    return {
        "train/loss": event.loss, "train/lr": event.lr, "train/tokens_per_second": event.tokens_per_second,
        "train/grad_norm": event.grad_norm, "train/tokens_seen": float(event.tokens_seen),
        "train/epoch": float(event.epoch),
    }


class Sink(Protocol):
    """One logger: opened from the run's RunStarted event, then given every event."""

    files: list[Path]  # where it writes, for the run's summary

    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """RUN/tensorboard/. `purge_step` is the first step this process logs: TensorBoard hides the
    events a stopped process wrote from there on (the resumed run logs those steps again)."""

    def __init__(self, started: RunStarted, quiet: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.files = [started.out_dir / TENSORBOARD_DIR]
        self.writer = SummaryWriter(str(self.files[0]), purge_step=started.start_step, flush_secs=30)

    def handle(self, event: Event) -> None:
        if isinstance(event, (StepDone, Evaluation)):
            scalars = step_scalars(event) if isinstance(event, StepDone) else eval_scalars(event)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, event.step)
        elif isinstance(event, Sample):
            self.writer.add_text("sample", event.text, event.step)
        elif isinstance(event, CheckpointSaved):
            self.writer.flush()  # what a checkpoint covers is on disk, should the process be killed

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> Literal["offline"] | None:
    """Offline without an API key (no account needed; `wandb sync` uploads later); WANDB_MODE, when
    set, is the user's choice and wandb reads it itself."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return None
    return "offline"


class WandbSink:
    """Weights & Biases, its files under RUN/wandb/. The run id is kept in RUN/wandb-run-id, so a
    resumed training run continues the same W&B run (resume="allow")."""

    def __init__(self, started: RunStarted, quiet: bool) -> None:
        import wandb

        self.wandb, id_file = wandb, started.out_dir / WANDB_ID_FILE
        self.files = [started.out_dir / "wandb"]
        stored = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "gptcli"), name=started.out_dir.name,
                dir=str(started.out_dir), id=stored or None, resume="allow", mode=wandb_mode(),
                settings=wandb.Settings(silent=True) if quiet else None,
            )
        except wandb.errors.Error as exc:  # no network, a bad API key: one line, not a traceback
            raise GptcliError(f"--logger wandb could not start: {_first_line(exc)}") from exc
        # The settings may change on --resume (--epochs, --max-steps): W&B must not refuse that.
        self.run.config.update({**started.settings.to_dict(), "parameters": started.parameters},
                               allow_val_change=True)
        if self.run.id != stored and not self.run.disabled:  # WANDB_MODE=disabled: a dummy run, nothing to keep
            atomic_write_text(id_file, self.run.id + "\n")
        # A resumed online run: W&B already has the steps before this one (it would drop them with a warning).
        self.first_step = int(self.run.starting_step)

    def handle(self, event: Event) -> None:
        if not isinstance(event, (StepDone, Evaluation, Sample)) or event.step < self.first_step:
            return
        if isinstance(event, StepDone):
            self.run.log(step_scalars(event), step=event.step)
        elif isinstance(event, Evaluation):
            self.run.log(eval_scalars(event), step=event.step)
        else:
            self.run.log({"sample": self.wandb.Html(f"<pre>{html.escape(event.text)}</pre>")}, step=event.step)

    def close(self) -> None:
        self.run.finish()


class CsvSink:
    """RUN/metrics.csv, one row per evaluation with metrics.jsonl's columns (rebuilt from
    metrics.jsonl at the start, which the core has cut back to the resumed step: so every evaluation
    is there once, even when --logger csv is first given on a --resume), and RUN/steps.csv."""

    def __init__(self, started: RunStarted, quiet: bool) -> None:
        run = started.out_dir
        self.files = [run / METRICS_CSV, run / STEPS_CSV]
        self.evals = _CsvFile(run / METRICS_CSV, EVAL_COLUMNS, read_metrics(run))
        kept = [row for row in _read_rows(run / STEPS_CSV) if _step(row) < started.start_step]
        self.steps = _CsvFile(run / STEPS_CSV, STEP_COLUMNS, kept)

    def handle(self, event: Event) -> None:
        if isinstance(event, Evaluation):
            self.evals.append(event.to_dict())
        elif isinstance(event, StepDone):
            self.steps.append(dataclasses.asdict(event))

    def close(self) -> None:
        self.evals.close()
        self.steps.close()


class _CsvFile:
    """A CSV file started over (durably) with `rows`, then appended to one flushed row at a time."""

    def __init__(self, path: Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(jsonio.finite_or_null(row) for row in rows)
        atomic_write_text(path, text.getvalue())
        self.handle = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.writer = csv.DictWriter(self.handle, columns, extrasaction="ignore")

    def append(self, row: dict[str, Any]) -> None:
        self.writer.writerow(jsonio.finite_or_null(row))  # NaN and inf as empty cells, as null in metrics.jsonl
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _step(row: dict[str, Any]) -> float:
    """A row's step; a row cut short (the process killed while writing it) counts as past any step."""
    try:
        return int(row["step"]) if None not in row.values() else float("inf")
    except (KeyError, TypeError, ValueError):
        return float("inf")


SINKS: dict[str, Callable[[RunStarted, bool], Sink]] = {
    "tensorboard": TensorBoardSink, "wandb": WandbSink, "csv": CsvSink,
}


class Loggers:
    """The chosen sinks as one: opened on RunStarted, every event to each, all closed by `close`
    (each one, even when another fails to close)."""

    def __init__(self, kinds: Sequence[str], quiet: bool = False) -> None:
        self.kinds = list(dict.fromkeys(kinds))  # `--logger csv --logger csv` is one logger
        self.quiet = quiet
        self.sinks: list[Sink] = []
        self.stack = ExitStack()

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted) and not self.sinks:
            for kind in self.kinds:
                self._open(kind, event)
        for sink in self.sinks:
            sink.handle(event)

    def _open(self, kind: str, started: RunStarted) -> None:
        try:
            sink = SINKS[kind](started, self.quiet)
        except (ImportError, OSError) as exc:  # a broken install, an unwritable run directory
            raise GptcliError(f"--logger {kind} could not start: {_first_line(exc)}") from exc
        self.stack.callback(sink.close)
        self.sinks.append(sink)

    @property
    def files(self) -> list[Path]:
        return [path for sink in self.sinks for path in sink.files]

    def close(self) -> None:
        self.sinks = []
        self.stack.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
