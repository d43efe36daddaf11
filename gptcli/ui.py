"""Rich rendering on stderr. The core yields events; only this module and the commands print."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
