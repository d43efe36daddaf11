"""The `gptcli` command: a thin Typer app. Each subcommand lives in `gptcli/commands/` and imports
torch and other heavy modules only when it runs, so `gptcli --help` stays instant.

Every error reaches the user as one line, `error: ...` on stderr, with a shell-style exit code:
usage errors (Typer's own, and the shared number check below) exit 2, `GptcliError`s their code.
Both are handled here, for every command registered on the app, so a new command gets them too.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup

try:  # newer typer carries its own copy of click
    from typer._click import core as click_core
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - typer that uses click itself
    from click import core as click_core  # type: ignore[no-redef]
    from click import exceptions as click_errors  # type: ignore[no-redef]

from gptcli import __version__, stdio
from gptcli.commands import convert, evaluate, fetch, info, prepare, sample, train
from gptcli.errors import EXIT_USAGE, GptcliError

_NO_ARGS_IS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())  # bare `gptcli` (help already printed)
INT64_MAX = 2**63 - 1  # what torch and numpy index with: a larger int option is a typo, not a request


class _NumberError(click_errors.UsageError):
    """A number option out of what any command accepts (its message is complete as it is)."""


def _option_name(param: click_core.Parameter) -> str:
    """How the user wrote the parameter: its long option (`--top-p`), or an argument's name."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    if longs:
        return max(longs, key=len)
    # (typer's click has no `human_readable_name`: an argument is named as its metavar shows it)
    return str(param.name).upper() if param.param_type_name == "argument" else param.opts[0]


def _check_number(param: click_core.Parameter, value: Any) -> None:
    """The check every number option shares: floats finite, ints within 64 bits."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if isinstance(item, float) and not math.isfinite(item):
            raise _NumberError(f"{_option_name(param)} must be a finite number, got {item}")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT64_MAX:
            raise _NumberError(f"{_option_name(param)} must fit in 64 bits (at most {INT64_MAX}), got {item}")


def _add_number_check(param: click_core.Parameter) -> None:
    """Run `_check_number` on the parsed value, before the parameter's own callback and the command."""
    original = param.callback

    def checked(ctx: click_core.Context, param: click_core.Parameter, value: Any) -> Any:
        if value is not None:
            _check_number(param, value)
        return original(ctx, param, value) if original is not None else value

    param.callback = checked


def _add_number_checks(command: click_core.Command) -> None:
    for sub in getattr(command, "commands", {}).values():  # a group's subcommands
        _add_number_checks(sub)
    for param in command.params:
        if not getattr(param, "_gptcli_checked", False):
            _add_number_check(param)
            _set_metavar(param)
            param._gptcli_checked = True  # type: ignore[attr-defined]
    _quiet_help_flag(command)


def _quiet_help_flag(command: click_core.Command) -> None:
    """--help is a flag too: no `<bool>` after it (click makes the option anew for each help). Its
    default False (not None) also spares typer's value coercion, which would import pydantic."""
    make = command.get_help_option

    def help_option(ctx: click_core.Context) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
            option.default = False
        return option

    command.get_help_option = help_option  # type: ignore[method-assign]


_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "Path": "PATH"}


def _set_metavar(param: click_core.Parameter) -> None:
    """Help shows what to type: INTEGER, FLOAT, TEXT, PATH or the choices `[a|b]`, and nothing after
    a flag (typer's own labels are `<int>`, `<str>`, and `<bool>` even for flags)."""
    if param.metavar is not None:
        label = param.metavar
    elif param.param_type_name == "argument":
        label = str(param.name).upper()
    elif getattr(param, "is_flag", False):
        label = ""
    else:
        typer_label = param.display_type(None)  # type: ignore[attr-defined]  # "<int>", "<a|b>", "<list[str]>"
        inner = typer_label[1:-1]
        label = f"[{inner}]" if "|" in inner else _METAVARS.get(inner.removeprefix("list[").rstrip("]"), inner.upper())
    param.metavar = label
    if isinstance(param, TyperArgument):
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]  # its name says it


def _usage_line(exc: click_errors.ClickException) -> str:
    """Click's message on one line, pointing at the command's --help for usage errors."""
    text = exc.format_message().replace("Value error, ", "")  # pydantic's prefix in typer's messages
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_errors.UsageError) and not isinstance(exc, _NumberError) and ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


class OneLineErrorsGroup(TyperGroup):
    """The app's group: number checks on every command's options, and every error as one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_number_checks(self)

    def add_command(self, cmd: click_core.Command, name: str | None = None) -> None:
        super().add_command(cmd, name)
        _add_number_checks(cmd)

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        if not extra.pop("standalone_mode", True):
            return super().main(args, prog_name, standalone_mode=False, **extra)
        stdio.guard_stdout()
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
            stdio.flush_stdout()  # report a failed write of the results here, not at interpreter exit
        except _NO_ARGS_IS_HELP as exc:
            sys.exit(exc.exit_code)  # the help is already printed
        except click_errors.ClickException as exc:
            _error(_usage_line(exc), exc.exit_code)
        except typer.Abort:
            _error("aborted", 1)
        except GptcliError as exc:
            if isinstance(exc, stdio.StdoutError):
                stdio.silence_stdout()  # what is still buffered cannot be written either
            _error(exc.message, exc.exit_code)
        finally:
            stdio.restore_stdout()
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click_core.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # `gptcli ... | head`: the reader left; exit quietly like other Unix tools (128 + SIGPIPE),
            # with stdout on /dev/null so that Python's final flush does not complain.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None


def _error(message: str, exit_code: int) -> None:
    from gptcli.paths import display_path

    typer.echo(f"error: {display_path(message)}", err=True)  # file names that are not UTF-8 as \xff
    sys.exit(exit_code)


app = typer.Typer(
    name="gptcli",
    cls=OneLineErrorsGroup,
    help="Pretrain GPT-2-style language models from scratch and load OpenAI's GPT-2 weights.\n\n"
    "Results go to stdout, progress and logs to stderr. An error is one line, `error: ...`, on stderr, "
    f"and a non-zero exit code ({EXIT_USAGE} for bad usage or input).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _name, _module in (
    ("fetch", fetch),
    ("prepare", prepare),
    ("train", train),
    ("eval", evaluate),
    ("sample", sample),
    ("convert", convert),
    ("info", info),
):
    app.command(_name, help=_module.__doc__)(_module.command)


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
    app(prog_name="gptcli")  # also under `python -m gptcli`, so messages name the command to type
