"""One declaration per command-line option. A dataclass field made with `option(...)` is the whole
option: its name (the field's, `--lr` for `lr`), its type (the field's annotation: a Literal is a
choice), its default (the field's), its help text and help panel, whether `--resume` may change it,
and its range check. The settings validate themselves from these declarations (`check_options`),
and the `train` command builds its Typer options from them (`gptcli.commands._options`).

Standard library only (`gptcli --help` reads it; no Typer here: the core validates with it too).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from gptcli.errors import UsageError

Check = Callable[[str, Any], None]
"""A range check: `check(option, value)` raises a UsageError naming the option (`--lr`)."""

_KEY = "gptcli.option"  # where a field's OptionSpec sits in its metadata


@dataclass(frozen=True)
class OptionSpec:
    """What a field declares beyond its name, type and default."""

    help: str
    panel: str | None = None  # the --help section it is listed in (None: an argument's)
    flags: tuple[str, ...] = ()  # its names when not just `--field-name` ("--json"; a flag's only name)
    check: Check | None = None  # not run on None (an optional option left out)
    resumable: bool = False  # `--resume` may change it; any other setting is the run's for good
    metavar: str | None = None
    show_default: bool = True
    callback: Callable[[Any], Any] | None = None  # Typer's, for what a type cannot say (list[Literal])
    argument: bool = False  # positional, not an option

    def name(self, field: str) -> str:
        """How the user types it: its long flag (`--json` for `json_output`), else `--field-name`."""
        longs = [flag for flag in self.flags if flag.startswith("--")]
        return longs[0] if longs else "--" + field.replace("_", "-")


def option(default: Any, help: str, panel: str, *, flags: tuple[str, ...] = (), check: Check | None = None,
           resumable: bool = False, metavar: str | None = None, show_default: bool = True,
           callback: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field that is a command-line option (typed Any, as `dataclasses.field` is to mypy)."""
    spec = OptionSpec(help, panel, flags, check, resumable, metavar, show_default, callback)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def argument(default: Any, help: str) -> Any:
    """A dataclass field that is a positional argument."""
    spec = OptionSpec(help, show_default=False, argument=True)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def declared(cls: type) -> Iterator[tuple[dataclasses.Field[Any], OptionSpec, Any]]:
    """Each option field of the dataclass `cls`: (field, its spec, its resolved type), in order."""
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if _KEY in field.metadata:
            yield field, field.metadata[_KEY], hints[field.name]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # The annotations are strings (`from __future__ import annotations`): resolved once per class.
    return get_type_hints(cls)


def resumable(cls: type) -> tuple[str, ...]:
    """The fields of `cls` that `--resume` may change."""
    return tuple(field.name for field, spec, _ in declared(cls) if spec.resumable)


def choices(hint: Any) -> tuple[str, ...]:
    """The values a Literal type (or an optional one) allows; () for any other type."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(value for arg in get_args(hint) for value in choices(arg))
    return ()


def check_options(values: object, keys: bool = False) -> None:
    """Every option field of the dataclass instance `values` in range and among its choices, in
    declaration order: the first that is not is a usage error naming the option (with `keys`, the
    field, as a stored file names it: `lr`, not `--lr`)."""
    for field, spec, hint in declared(type(values)):
        value = getattr(values, field.name)
        if value is None:
            continue
        name = field.name if keys else spec.name(field.name)
        if spec.check is not None:
            spec.check(name, value)
        allowed = choices(hint)
        if allowed and value not in allowed:
            raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


_TYPES: dict[Any, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def check_types(cls: type, data: dict[str, Any]) -> None:
    """Stored values (JSON) of the dataclass `cls`'s fields, each of its field's type (an int is no
    bool, a bool no int): the first that is not is a usage error naming the key. Choices and ranges
    are `check_options`'s; fields of other types (a nested config) are their own class's."""
    hints = _hints(cls)
    for name, value in data.items():
        args = get_args(hints[name]) if get_origin(hints[name]) in (Union, types.UnionType) else (hints[name],)
        if value is None and type(None) in args:
            continue
        known = [_TYPES[arg] for arg in args if arg in _TYPES]
        if known and not any(isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
                             for kinds, _ in known):
            raise UsageError(f"{name} must be {' or '.join(what for _, what in known)}, got {value!r}")


# --- range checks -------------------------------------------------------------------------------


def at_least(low: int) -> Check:
    """An integer of at least `low`."""

    def check(name: str, value: int) -> None:
        if value < low:
            floor = "not be negative" if low == 0 else f"be at least {low}"
            raise UsageError(f"{name} must {floor}, got {value}")

    return check


def finite(low: float, *, above: bool = False, below: float | None = None) -> Check:
    """A finite number of at least `low` (above it with `above`), and under `below` when given."""
    bounds = f"{'above' if above else 'at least'} {low:g}" + (f" and below {below:g}" if below is not None else "")

    def check(name: str, value: float) -> None:
        outside = value < low or (above and value == low) or (below is not None and value >= below)
        if not math.isfinite(value) or outside:
            raise UsageError(f"{name} must be a finite number {bounds}, got {value}")

    return check


def between(low: int, high: int, high_text: str) -> Check:
    """An integer within [low, high]; `high_text` says the bound as people write it (2**63-1)."""

    def check(name: str, value: int) -> None:
        if not low <= value <= high:
            raise UsageError(f"{name} must be between {low} and {high_text}, got {value}")

    return check
