"""Token-by-token tables that `sample --logprobs` and `eval --per-token` print on stdout (rich)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gptcli import jsonio

if TYPE_CHECKING:
    from rich.table import Table

    from gptcli.logprobs import TokenLogprob

PIPE_WIDTH = 160
"""Columns of a table written to a pipe or file (rich would assume 80 and wrap the alternatives)."""


def shown(text: str) -> str:
    """A token's text, quoted, with newlines and other control characters escaped: `" the"`."""
    return jsonio.dumps(text, ensure_ascii=False)


def print_table(table: Table) -> None:
    from rich.console import Console

    Console(file=sys.stdout, width=None if sys.stdout.isatty() else PIPE_WIDTH).print(table)


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def logprob_table(records: Sequence[TokenLogprob], text_of: Callable[[int], str], k: int) -> Table:
    """One line per generated token: its text, log-probability and probability under the distribution
    sampled from, its log-probability under the model's own, and the `k` likeliest alternatives."""
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("token")
    for name in ("logprob", "prob", "model logprob"):
        table.add_column(name, justify="right")
    if k:
        table.add_column(f"top {k} (logprob)")
    for number, record in enumerate(records, start=1):
        cells: list[str | Text] = [str(number), Text(shown(text_of(record.token))), _number(record.logprob),
                 f"{math.exp(record.logprob):.4g}", _number(record.raw_logprob)]
        if k:
            cells.append(Text("  ".join(f"{shown(text_of(t))} {lp:.2f}" for t, lp in record.top)))
        table.add_row(*cells)
    return table


def per_token_table(
    rows: Sequence[tuple[int, str, float]], loss: float, perplexity: float, scored: int
) -> Table:
    """(position, token text, loss) of each predicted token, with its probability exp(-loss); the last
    row is the mean loss and the perplexity."""
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold", show_footer=True)
    table.add_column("#", justify="right", footer="")
    table.add_column("token", footer=f"mean of {scored:,}")
    table.add_column("probability", justify="right", footer=f"perplexity {perplexity:,.2f}")
    table.add_column("loss", justify="right", footer=_number(loss))
    for position, text, token_loss in rows:
        table.add_row(str(position), Text(shown(text)), f"{math.exp(-token_loss):.4g}", _number(token_loss))
    return table
