"""Convert GPT-2 weights to a gptcli model file (or a gptcli model to Hugging Face's format).

SOURCE is one of (detected unless --from says which):
OpenAI's release directory (hparams.json + model.ckpt.*), read without TensorFlow;
a Hugging Face GPT-2 directory (config.json + model.safetensors);
a gptcli model (a .safetensors file or a run directory).

The output is written atomically: a failure leaves no output file. Examples:

  gptcli convert models/124M --out gpt2-124M.safetensors

  gptcli convert runs/latest --to hf --out my-gpt-hf
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from gptcli.convert import ConvertResult


class Source(str, enum.Enum):
    auto = "auto"
    openai = "openai"
    hf = "hf"
    gptcli = "gptcli"


class Target(str, enum.Enum):
    gptcli = "gptcli"
    hf = "hf"


def command(
    source: Path = typer.Argument(
        ...,
        help="OpenAI release directory, Hugging Face GPT-2 directory, or gptcli model.",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output: a .safetensors file, or with --to hf a directory. Default: <source>/model.safetensors "
        "for OpenAI's files, ./<name>.safetensors for others, ./<name>-hf with --to hf.",
    ),
    from_format: Source = typer.Option(
        Source.auto, "--from", help="Source format; auto detects it from the files present."
    ),
    to_format: Target = typer.Option(
        Target.gptcli,
        "--to",
        help="gptcli: a model file for sample/eval/train --init; hf: a directory that "
        "transformers' GPT2LMHeadModel.from_pretrained loads.",
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Check the CRC-32C checksums stored in OpenAI's checkpoint index (a few seconds for 124M).",
    ),
    force: bool = typer.Option(
        False, "--force",
        help="With --to hf: write into an --out directory that is not empty (its config.json and "
        "model.safetensors are replaced, other files kept).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the result (output path, config) as JSON."),
) -> None:
    import json

    result = run_conversion(source, out, from_format.value, to_format.value, verify, force)
    if json_output:
        report = {
            "source": result.source,
            "from": result.source_format,
            "to": result.target_format,
            "output": str(result.output),
            "tensors": result.num_tensors,
            "bytes": result.num_bytes,
            "config": result.config.to_dict(),
        }
        typer.echo(json.dumps(report, indent=2))


def run_conversion(
    source: Path, out: Path | None, from_format: str, to_format: str, verify: bool, force: bool = False
) -> ConvertResult:
    """Convert with a progress bar on stderr; also used by `fetch gpt2 --convert`."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gptcli.convert import convert
    from gptcli.errors import EXIT_INTERRUPTED, GptcliError
    from gptcli.ui import console

    start = time.perf_counter()
    progress = Progress(
        TextColumn("converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )
    task = progress.add_task("", total=None)

    def on_tensor(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, description=name)

    try:
        with progress:
            result = convert(source, out, from_format, to_format, verify, on_tensor, force)
    except KeyboardInterrupt:
        raise GptcliError("interrupted; no output was written", EXIT_INTERRUPTED) from None
    c = result.config
    console.print(
        f"[green]✓[/] {result.source_format} → {result.target_format}: {result.output} "
        f"({result.num_tensors} tensors, {result.num_bytes / 1e6:,.1f} MB; {c.n_layers} layers, "
        f"{c.emb_dim} dims, {c.n_heads} heads, context {c.context_length}, vocab {c.vocab_size}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return result
