"""Convert GPT-2 weights to a gptcli model file, or a model to Hugging Face's, the book's or llama.cpp's format.

SOURCE is one of (detected unless --from says which):
OpenAI's release directory (hparams.json + model.ckpt.*), read without TensorFlow;
a Hugging Face GPT-2 directory (config.json + model.safetensors);
a gptcli model (a .safetensors file or a run directory);
the book's model.pth or model_and_optimizer.pth (or a .safetensors with the chapter's keys).

A .pth file is a pickle: gptcli reads it only with torch.load(weights_only=True),
torch's restricted unpickler, which builds tensors and plain containers and refuses any other class (no code runs).
The config comes from the shapes; the heads are guessed only for GPT-2's widths (768/1024/1280/1600: 12/16/20/25),
otherwise pass --n-heads. The optimizer state of model_and_optimizer.pth is not converted (train --init starts
a fresh AdamW); its step count is kept in the output's metadata.

The output is written atomically: a failure leaves no output file. Examples:

  gptcli convert models/124M --out gpt2-124M.safetensors

  gptcli convert model.pth --out model.safetensors

  gptcli convert runs/latest --to hf --out my-gpt-hf

  gptcli convert runs/latest --to book --out model-book.safetensors

  gptcli convert runs/latest --to gguf --gguf-type q8_0 --out model.gguf
"""

from __future__ import annotations

from pathlib import Path

import typer

from gptcli.choices import GGUFType, SourceFormat, TargetFormat


def command(
    source: Path = typer.Argument(
        ...,
        help="OpenAI release directory, Hugging Face GPT-2 directory, gptcli model, or the book's .pth.",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output: a .safetensors file, with --to hf a directory, with --to gguf a .gguf file. Default: "
        "<source>/model.safetensors for OpenAI's files, ./<name>.safetensors for others, ./<name>-hf with "
        "--to hf, ./<name>-book.safetensors with --to book, ./<name>.gguf with --to gguf.",
    ),
    from_format: SourceFormat = typer.Option(
        "auto", "--from", help="Source format; auto detects it from the files present."
    ),
    to_format: TargetFormat = typer.Option(
        "gptcli",
        "--to",
        help="gptcli: a model file for sample/eval/train --init; hf: a directory that "
        "transformers' GPT2LMHeadModel.from_pretrained loads; book: a .safetensors with exactly the chapter's "
        "GPTModel keys (att.mask buffers included, so GPTModel(cfg).load_state_dict(load_file(path)) works; "
        "prints the GPT_CONFIG to use); gguf: a llama.cpp GGUF (gpt2 architecture, GPT-2's tokenizer).",
    ),
    n_heads: int | None = typer.Option(
        None,
        "--n-heads",
        min=1,
        help="Attention heads of a book model (not in its shapes). Default: GPT-2's for emb 768/1024/1280/1600.",
        show_default=False,
    ),
    gguf_type: GGUFType = typer.Option(
        "f32",
        "--gguf-type",
        help="With --to gguf: the type of the matrices (1-D tensors stay f32); q8_0 uses the gguf package's "
        "quantizer.",
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Check the CRC-32C checksums stored in OpenAI's checkpoint index (a few seconds for 124M).",
    ),
    force: bool = typer.Option(
        False, "--force",
        help="Replace an existing --out file (never a device or pipe); with --to hf, write into an --out "
        "directory that is not empty (its config.json and model.safetensors are replaced, other files kept).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the result (output path, config) as JSON."),
) -> None:
    import json

    from gptcli.commands._common import run_conversion

    result = run_conversion(source, out, from_format, to_format, verify, force, n_heads, gguf_type)
    gpt_config = None
    if result.target_format == "book":
        from gptcli.formats.book import book_config_dict

        gpt_config = book_config_dict(result.config)
        if not json_output:
            typer.echo(f"GPT_CONFIG = {gpt_config!r}")
    if json_output:
        report = {
            "source": result.source,
            "from": result.source_format,
            "to": result.target_format,
            "output": str(result.output),
            "tensors": result.num_tensors,
            "bytes": result.num_bytes,
            "config": result.config.to_dict(),
            "notes": list(result.notes),
        }
        if gpt_config is not None:
            report["GPT_CONFIG"] = gpt_config
        if result.target_format == "gguf":
            report["gguf_type"] = gguf_type
        typer.echo(json.dumps(report, indent=2))
