"""Say what a model file or training run is: config, parameter counts, dtype, size and origin.

MODEL_OR_RUN is anything gptcli reads: a gptcli .safetensors, a run directory (with its corpus, steps,
tokens seen, best validation loss, last checkpoint time and last evaluations), OpenAI's release
directory, a Hugging Face GPT-2 directory, the book's .pth (read with torch.load(weights_only=True))
or chapter-keyed .safetensors, or a GGUF written by `gptcli convert --to gguf`. Nothing is computed
with the model; parameter counts follow from the config: "untied" counts a separate output head
(the chapter's 163M for GPT-2 124M), "tied" shares it with the token embedding (124M). Examples:

  gptcli info runs/latest

  gptcli info models/124M --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def command(
    source: Path = typer.Argument(
        Path("runs/latest"), help="Model file or directory (default: the latest run).", show_default=False
    ),
    n_heads: int | None = typer.Option(
        None, "--n-heads", min=1, show_default=False,
        help="Attention heads of a book .pth whose width is not GPT-2's (they are not in its shapes).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the report as (strict) JSON."),
) -> None:
    from gptcli import jsonio
    from gptcli.info import model_info

    report = model_info(source, n_heads)
    if json_output:
        typer.echo(jsonio.dumps(report, indent=2))
        return
    _print_report(report)


def _config_line(config: dict[str, Any]) -> str:
    yes = {True: "yes", False: "no"}
    return (
        f"vocab {config['vocab_size']:,} · context {config['context_length']:,} · emb {config['emb_dim']} · "
        f"heads {config['n_heads']} · layers {config['n_layers']} · qkv bias {yes[config['qkv_bias']]} · "
        f"tied head {yes[config['tie_weights']]} · dropout {config['drop_rate']}"
    )


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptcli.ui import byte_size

    out = Console(highlight=False)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("path", f"{report['path']} ({report['format']})")
    table.add_row("config", _config_line(report["config"]))
    counts = report["parameters"]
    table.add_row("parameters", f"{counts['total']:,} (untied head: {counts['untied']:,}; tied: {counts['tied']:,})")
    table.add_row("dtype", ", ".join(report["dtype"]))
    table.add_row("size", f"{byte_size(report['file_bytes'])} in {len(report['files'])} file(s)")
    origin = dict(report["origin"])
    evaluations = origin.pop("last_evaluations", None)
    for key, value in origin.items():
        if value is not None:
            table.add_row(key.replace("_", " "), _cell(value))
    out.print(table)
    if evaluations:
        out.print(_evaluations_table(evaluations))


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def _evaluations_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="last evaluations", title_justify="left", header_style="bold")
    columns = ("epoch", "step", "tokens_seen", "train_loss", "val_loss", "val_ppl")
    for name in columns:
        table.add_column(name.replace("_", " "), justify="right")
    for row in rows:
        cells = []
        for name in columns:
            value = row.get(name)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else f"{value:,}")
        table.add_row(*cells)
    return table
