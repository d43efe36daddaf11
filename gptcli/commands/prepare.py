"""Tokenize text corpora into memory-mappable token files for `gptcli train DATA_DIR`.

INPUTS: text files, directories (searched recursively for --glob) or '-' for stdin; each file is one document.
Output: DATA_DIR/train.bin and val.bin (GPT-2 BPE ids, uint16, documents separated by <|endoftext|>), meta.json.
Memory stays bounded whatever the corpus size; tokenization runs on --workers threads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gptcli.choices import DecodeErrors, SplitMode

if TYPE_CHECKING:
    from gptcli.prepare import PrepareFinished


def command(
    inputs: list[str] = typer.Argument(
        ..., show_default=False, help="Text files, directories (recursive, see --glob), or '-' for stdin.",
    ),
    out: Path = typer.Option(..., "--out", "-o", show_default=False,
                             help="Directory for train.bin, val.bin and meta.json."),
    val_ratio: float = typer.Option(0.1, "--val-ratio", help="Share of the data for validation (val.bin)."),
    split_by: SplitMode = typer.Option(
        "auto", "--split-by",
        help="document: whole documents go to val.bin; position: the last --val-ratio of the tokens (as "
        "the chapter splits its one text); auto: by document when there are at least 1/val-ratio documents.",
    ),
    glob: str = typer.Option("*.txt", "--glob", help="File pattern searched for in directories."),
    workers: int | None = typer.Option(
        None, "--workers", show_default=False, help="Tokenizer threads (default: all cores).",
    ),
    errors: DecodeErrors = typer.Option(
        "strict", "--errors",
        help="strict: stop at text that is not UTF-8, naming the file; replace: read it with U+FFFD instead.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace prepared data already in --out."),
    json_output: bool = typer.Option(False, "--json", help="Print meta.json's content on stdout instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar on stderr."),
) -> None:
    from gptcli.errors import EXIT_INTERRUPTED, GptcliError
    from gptcli.prepare import PrepareFinished, PrepareProgress, PrepareStarted, prepare
    from gptcli.textinput import stdin_bytes

    finished: PrepareFinished | None = None
    view = _ProgressView(quiet)
    events = prepare(
        inputs, out, val_ratio=val_ratio, split_by=split_by, glob=glob, workers=workers, errors=errors,
        force=force, stdin=stdin_bytes() if "-" in inputs else None,
    )
    try:
        for event in events:
            if isinstance(event, PrepareProgress):
                view.update(event.bytes_done, event.tokens_done)
            elif isinstance(event, PrepareStarted):
                view.start(event.total_bytes, event.sources, event.workers, event.split_by, event.out_dir)
            elif isinstance(event, PrepareFinished):
                finished = event
                view.update(event.bytes_read, event.tokens)
    except KeyboardInterrupt:
        raise GptcliError("interrupted; nothing was written (run prepare again)", EXIT_INTERRUPTED) from None
    finally:
        events.close()  # an interrupted run removes its temporary files
        view.stop()
    assert finished is not None
    if json_output:
        sys.stdout.write(json.dumps(finished.meta, ensure_ascii=False) + "\n")
    else:
        _print_summary(finished)


class _ProgressView:
    """A rich progress bar on stderr: bytes read (with bytes/s), tokens written (with tokens/s)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Any = None
        self.task: Any = None
        self.started = time.perf_counter()

    def start(self, total_bytes: int | None, sources: int, workers: int, split_by: str, out_dir: Path) -> None:
        self.started = time.perf_counter()
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from gptcli.ui import console

        console.print(
            f"[bold]gptcli prepare[/] {sources} document(s) → {out_dir} ({workers} worker(s), split by {split_by})",
            highlight=False,
        )
        self.progress = Progress(
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tokens]} tokens"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("prepare", total=total_bytes, tokens="0", tps="-")
        self.progress.start()

    def update(self, bytes_done: int, tokens: int) -> None:
        if self.progress is None:
            return
        from gptcli.ui import human

        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, completed=bytes_done, tokens=f"{tokens:,}", tps=human(tokens / elapsed))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _print_summary(finished: PrepareFinished) -> None:
    """The result, on stdout: what each file holds, and the throughput."""
    from rich.console import Console
    from rich.table import Table

    from gptcli.ui import byte_size

    meta = finished.meta
    table = Table(header_style="bold", title=f"{finished.out_dir} (split by {meta['split']['by']})",
                  title_justify="left")
    for name in ("file", "documents", "tokens", "share", "size"):
        table.add_column(name, justify="left" if name == "file" else "right")
    for split in ("train", "val"):
        info = meta[split]
        documents = "-" if info["documents"] is None else f"{info['documents']:,}"
        size = info["tokens"] * (2 if meta["dtype"] == "uint16" else 4)
        table.add_row(info["file"], documents, f"{info['tokens']:,}", f"{info['tokens'] / meta['tokens']:.1%}",
                      byte_size(size))
    table.add_row("total", f"{meta['documents']:,}", f"{meta['tokens']:,}", "", byte_size(meta["bytes"]) + " text",
                  style="bold")
    seconds = max(finished.seconds, 1e-9)
    width = None if sys.stdout.isatty() else max(80, len(str(finished.out_dir)) + 40)
    stdout = Console(file=sys.stdout, width=width, highlight=False)
    stdout.print(table)
    stdout.print(
        f"{len(meta['sources']):,} source(s), {byte_size(finished.bytes_read)} in {seconds:.1f} s: "
        f"{byte_size(finished.bytes_read / seconds)}/s, {finished.tokens / seconds:,.0f} tokens/s"
    )
