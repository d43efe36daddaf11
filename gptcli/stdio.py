"""stdout, one policy for every command: a failure to write results (a full disk, a closed
descriptor) is one `error:` line and exit 1, never a traceback or a silent exit 0 (stdin's side is
`textinput.stdin_bytes`). A reader that left (`| head`) is exit 141, as other Unix
tools do: see `cli.OneLineErrorsGroup`."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from gptcli.errors import GptcliError


class StdoutError(GptcliError):
    """Writing the command's results failed (not a broken pipe, which is a reader leaving)."""


class _GuardedStdout:
    """sys.stdout with its write errors turned into `StdoutError`; everything else passes through."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _guard(self, method: str, *args: Any) -> Any:
        if self._stream is None:  # the process started with descriptor 1 closed
            raise StdoutError("cannot write to stdout: it is closed")
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            why = "it is closed" if exc.errno == errno.EBADF else exc.strerror or str(exc)
            raise StdoutError(f"cannot write to stdout: {why}") from None

    def write(self, text: str) -> int:
        return int(self._guard("write", text))

    def flush(self) -> None:
        self._guard("flush")

    def isatty(self) -> bool:
        return self._stream is not None and bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise StdoutError("cannot write to stdout: it is closed")
        return getattr(self._stream, name)


def silence_stdout() -> None:
    """Point descriptor 1 at /dev/null, so the interpreter's last flush of what is still buffered
    does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    except OSError:
        pass


def guard_stdout() -> None:
    """Install the guard on sys.stdout (once) for the rest of the process."""
    if not isinstance(sys.stdout, _GuardedStdout):
        sys.stdout = _GuardedStdout(sys.stdout)


def restore_stdout() -> None:
    if isinstance(sys.stdout, _GuardedStdout):
        sys.stdout = sys.stdout._stream


def flush_stdout() -> None:
    """Flush the results now, where a failure can still be reported (not at interpreter exit)."""
    if sys.stdout is not None:
        sys.stdout.flush()
