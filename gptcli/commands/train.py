"""(work in progress)"""

import typer


def command() -> None:
    raise typer.Exit(1)
