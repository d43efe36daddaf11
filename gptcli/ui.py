"""Rich rendering on stderr. The core yields events; only this module and the commands print."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from gptcli.events import Evaluation, RunFinished, RunStarted

console = Console(stderr=True)

# Rows shown live; the full table is printed once the run ends.
LIVE_ROWS = 12


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def byte_size(n: float) -> str:
    """Bytes for people, in powers of 1000: `512 B`, `1.5 MB`, `3.2 GB`."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def _ppl(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def loss_table(rows: list[Evaluation], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("epoch", "step", "tokens", "train loss", "val loss", "train ppl", "val ppl", "lr"):
        table.add_column(name, justify="right", no_wrap=True)
    for e in rows:
        table.add_row(
            str(e.epoch), f"{e.step:06d}", f"{e.tokens_seen:,}", f"{e.train_loss:.3f}", f"{e.val_loss:.3f}",
            _ppl(e.train_ppl), _ppl(e.val_ppl), f"{e.lr:.1e}",
        )
    return table


class TrainView:
    """Progress bar (epoch, step, tokens/s, ETA, loss) under a live table of evaluations."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.rows: list[Evaluation] = []
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None
        self.live: Live | None = None

    def _render(self) -> Group:
        return Group(loss_table(self.rows[-LIVE_ROWS:]), self.progress)

    def start(self, event: RunStarted) -> None:
        if self.quiet:
            return
        s = event.settings
        c = event.config
        resumed = f", resuming at step {event.start_step}" if event.start_step else ""
        console.print(
            f"[bold]gptcli train[/] {s.corpus} → {event.out_dir}  ({event.device}"
            f"{f' × {event.world_size}' if event.world_size > 1 else ''}{resumed})\n"
            f"model: {human(event.parameters)} parameters, {c.n_layers} layers, {c.n_heads} heads, "
            f"emb {c.emb_dim}, context {c.context_length}, {event.precision} · data: "
            f"{event.train_tokens:,} training and {event.val_tokens:,} validation tokens, "
            f"{event.steps_per_epoch} steps/epoch"
        )
        self.task = self.progress.add_task(
            "train", total=event.total_steps, completed=event.start_step,
            epoch=1, epochs="-" if s.sampling == "random" else s.epochs, tps="-", loss="-",
        )
        self.live = Live(self._render(), console=console, refresh_per_second=4)
        self.live.start()

    def step(self, epoch: int, steps_done: int, loss: float, tokens_per_second: float) -> None:
        if self.task is not None:
            self.progress.update(
                self.task, completed=steps_done, epoch=epoch, loss=f"{loss:.3f}", tps=f"{tokens_per_second:,.0f}"
            )

    def evaluation(self, event: Evaluation) -> None:
        self.rows.append(event)
        if self.live is not None:
            self.live.update(self._render())

    def message(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    def finish(self, event: RunFinished | None) -> None:
        if self.live is not None:
            self.live.update(Group(self.progress))
            self.live.stop()
            self.live = None
        if self.quiet or event is None:
            return
        if self.rows:
            console.print(loss_table(self.rows, title="Evaluations"))
        best = f"{event.best_val_loss:.3f}" if event.best_val_loss is not None else "-"
        console.print(
            f"[bold]{event.reason}[/]: {event.steps} steps, {event.tokens_seen:,} tokens in "
            f"{event.seconds / 60:.2f} min ({event.tokens_per_second:,.0f} tok/s) · best val loss {best}"
        )
        console.print("files: " + ", ".join(str(p) for p in event.files))
