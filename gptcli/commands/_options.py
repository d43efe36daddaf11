"""A Typer command from option declarations (`gptcli.options`): `@typer_options` on
`command(ctx, a: GroupA, b: GroupB, ...)`, each group a dataclass of `option(...)` fields, makes the
Typer command whose options are the groups' fields, and calls `command` with each group built from
what was typed. The fields are the one declaration of each option: the Typer signature (read from
`__signature__`) is generated, listing the options panel by panel in the order the panels first
appear, each panel's options in the order they are declared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, get_type_hints

import typer

from gptcli.options import OptionSpec, declared


def typer_options(command: Callable[..., None]) -> Callable[..., None]:
    """The Typer command for `command(ctx, *groups)` (see the module's docstring)."""
    hints = get_type_hints(command)
    groups: list[type] = [hints[name] for name in list(inspect.signature(command).parameters)[1:]]
    parameters = [_parameter(field.name, field.default, spec, hint)
                  for group in groups for field, spec, hint in declared(group)]
    panels = list(dict.fromkeys(p.default.rich_help_panel for p in parameters))
    # Typer lists each panel where its first option stands: keep a panel's options together.
    parameters.sort(key=lambda p: (p.default.rich_help_panel is not None, panels.index(p.default.rich_help_panel)))

    def entry(ctx: typer.Context, **values: Any) -> None:
        command(ctx, *(group(**{f.name: values[f.name] for f, _, _ in declared(group)}) for group in groups))

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    entry.__signature__ = inspect.Signature([context, *parameters])  # type: ignore[attr-defined]
    entry.__annotations__ = {}  # Typer resolves these too: the signature's are the ones that count
    entry.__doc__, entry.__name__ = command.__doc__, command.__name__
    return entry


def _parameter(name: str, default: Any, spec: OptionSpec, hint: Any) -> inspect.Parameter:
    info: Any
    if spec.argument:
        info = typer.Argument(default, help=spec.help, show_default=spec.show_default)
    else:
        info = typer.Option(default, *spec.flags, help=spec.help, rich_help_panel=spec.panel, metavar=spec.metavar,
                            show_default=spec.show_default, callback=spec.callback)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint)


def typed_options(ctx: typer.Context) -> tuple[str, ...]:
    """The names of the options typed on the command line (not left at their defaults), in the order
    they were typed (Click processes typed options first, in that order)."""
    return tuple(name for name in ctx.params if _typed(ctx, name))


def _typed(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"
