"""Download the chapter's corpus, GPT-2's tokenizer files or OpenAI's GPT-2 weights.

WHAT is one of:
verdict: the chapter's training text (`train` with no corpus uses it);
tokenizer: GPT-2's encoder.json and vocab.bpe, so the tokenizer works offline;
gpt2: OpenAI's seven release files of --size (convert them with --convert or `gptcli convert`).

Files go to gptcli's cache ($GPTCLI_HOME, else $XDG_CACHE_HOME/gptcli or ~/.cache/gptcli)
unless --out/--dir say otherwise. An interrupted download resumes when the command is run again;
files are verified before they are put in place; complete files are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gptcli.choices import GPT2_SIZES, FetchWhat, GPT2Size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

    from gptcli.transfer import Fetched, FetchEvent, RetryPolicy


def command(
    what: FetchWhat = typer.Argument(..., help="What to download (see above).", show_default=False),
    size: GPT2Size = typer.Option(GPT2_SIZES[0], "--size", help="GPT-2 model size (gpt2 only)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="File to write the corpus to (verdict only; default: the cache).",
        dir_okay=False,
    ),
    directory: Path | None = typer.Option(
        None,
        "--dir",
        help="Directory for the files (gpt2: default <cache>/models/<size>; tokenizer: default <cache>/tokenizer).",
        file_okay=False,
    ),
    convert: bool = typer.Option(
        False,
        "--convert",
        help="gpt2 only: convert the checkpoint to <dir>/model.safetensors afterwards (usable as `--model <dir>`).",
    ),
    mirror: str | None = typer.Option(
        None,
        "--mirror",
        envvar="GPTCLI_MIRROR",
        show_envvar=True,
        help="Fetch from this http(s):// URL or local directory (or file:// URL) instead of the official URLs, "
        "with the "
        "layout the-verdict.txt, encodings/<file>, <size>/<file> and an optional SHA256SUMS.",
    ),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries per URL on connection errors and 5xx."),
    backoff: float = typer.Option(
        1.0, "--backoff", min=0.0, help="Seconds before the first retry; doubles on each further one."
    ),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for the server."),
    json_output: bool = typer.Option(
        False, "--json", help="Print what was fetched (paths, bytes, sha256) as JSON on stdout."
    ),
) -> None:
    from gptcli.transfer import RetryPolicy

    _check_options(what, out, directory, convert)
    policy = RetryPolicy(retries=retries, backoff=backoff, timeout=timeout)
    results = _fetch(what, size, out, directory, mirror, policy, json_output)
    converted = None
    if convert:
        from gptcli.commands._common import run_conversion

        model_dir = results[0].path.parent
        converted = run_conversion(model_dir, model_dir / "model.safetensors", "openai", "gptcli", True).output
    _report(results, converted, json_output)


def _check_options(what: str, out: Path | None, directory: Path | None, convert: bool) -> None:
    from gptcli.errors import UsageError

    if out is not None and what != "verdict":
        raise UsageError("--out is for `fetch verdict`; use --dir for the other files")
    if directory is not None and what == "verdict":
        raise UsageError("`fetch verdict` takes --out FILE, not --dir")
    if convert and what != "gpt2":
        raise UsageError("--convert is for `fetch gpt2`")


def _fetch(what: str, size: str, out: Path | None, directory: Path | None, mirror: str | None,
           policy: RetryPolicy, want_sha256: bool) -> list[Fetched]:
    """The files of `what`, with a progress bar each; Ctrl-C keeps the partial file for a resume."""
    from gptcli import download
    from gptcli.errors import EXIT_INTERRUPTED, GptcliError
    from gptcli.ui import console

    renderer = _Renderer(console)
    try:
        with renderer:
            if what == "verdict":
                return [download.fetch_verdict(out, mirror, renderer.on_event, policy, want_sha256=want_sha256)]
            if what == "tokenizer":
                return download.fetch_tokenizer(directory, mirror, renderer.on_event, policy, want_sha256=want_sha256)
            return download.fetch_gpt2(size, directory, mirror, renderer.on_event, policy, want_sha256=want_sha256)
    except KeyboardInterrupt:
        raise GptcliError(
            "interrupted; the partial download is kept as a .part file, run the same command to resume",
            EXIT_INTERRUPTED,
        ) from None


def _report(results: list[Fetched], converted: Path | None, json_output: bool) -> None:
    """A summary line on stderr; with --json, what was fetched on stdout."""
    import json

    from gptcli.ui import console

    where = results[0].path.parent if len(results) > 1 else results[0].path
    fetched = sum(1 for r in results if not r.skipped)
    console.print(
        f"[green]✓[/] {len(results)} file(s) in {where} ({fetched} downloaded, "
        f"{len(results) - fetched} already complete)"
    )
    if json_output:
        files = [{"name": r.name, "path": str(r.path), "bytes": r.bytes, "sha256": r.sha256, "url": r.url,
                  "skipped": r.skipped} for r in results]
        report: dict[str, object] = {"files": files}
        if converted is not None:
            report["converted"] = str(converted)
        typer.echo(json.dumps(report, indent=2))


class _Renderer:
    """A rich progress bar per file on stderr, fed by the downloader's events."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

    def on_event(self, event: FetchEvent) -> None:
        from rich.markup import escape

        name = escape(event.name)
        if event.kind == "start":
            if not self.tasks:
                self.progress.start()  # only once a transfer begins: no empty bar when all is skipped
            if event.name in self.tasks:
                self.progress.reset(self.tasks[event.name], total=event.total, completed=event.done)
            else:
                self.tasks[event.name] = self.progress.add_task(name, total=event.total, completed=event.done)
            if event.done:
                self.progress.console.print(f"resuming {name} at {event.done:,} bytes")
        elif event.kind == "progress":
            self.progress.update(self.tasks[event.name], completed=event.done, total=event.total)
        elif event.kind == "retry":
            self.progress.console.print(f"[yellow]{name}[/]: {escape(event.message)} ({escape(event.url)})")
        elif event.kind == "fallback":
            self.progress.console.print(
                f"[yellow]{name}[/]: {escape(event.url)} failed ({escape(event.message)}); trying the next URL"
            )
        elif event.kind == "skip":
            self.progress.console.print(f"{name}: already complete, skipped")
        elif event.kind == "done" and event.name in self.tasks:
            self.progress.update(self.tasks[event.name], completed=event.done, total=event.total)
