"""Errors the CLI turns into a one-line message and an exit code instead of a traceback."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (schedulers, `timeout`): 128 + 15


class GptcliError(Exception):
    """A failure the user can act on. `exit_code` follows shell conventions (2 = bad usage/input)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(GptcliError):
    """Invalid options or input: exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
