"""The `gptcli` command: a thin Typer app. Each subcommand lives in `gptcli/commands/` and imports
torch and other heavy modules only when it runs, so `gptcli --help` stays instant."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from gptcli import __version__
from gptcli.commands import convert, evaluate, fetch, info, prepare, sample, train
from gptcli.errors import GptcliError

app = typer.Typer(
    name="gptcli",
    help="Pretrain GPT-2-style language models from scratch and load OpenAI's GPT-2 weights.\n\n"
    "Results go to stdout, progress and logs to stderr.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a GptcliError into `error: ...` on stderr and its exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GptcliError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # `gptcli ... | head`: the reader left; exit quietly like other Unix tools.
            sys.stderr.close()
            raise typer.Exit(141) from None

    return wrapper


for _name, _module in (
    ("fetch", fetch),
    ("prepare", prepare),
    ("train", train),
    ("eval", evaluate),
    ("sample", sample),
    ("convert", convert),
    ("info", info),
):
    app.command(_name, help=_module.__doc__)(_one_line_errors(_module.command))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


def main() -> None:
    app()
