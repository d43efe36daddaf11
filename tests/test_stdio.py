"""The standard streams with real processes and descriptors: a full disk or a closed descriptor on
stdout, and a closed stdin, give one `error:` line and a non-zero exit, never a traceback or exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


def gptcli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=kwargs.pop("capture", False),
                          stderr=subprocess.PIPE, text=True, timeout=120, **kwargs)


def _one_error_line(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {says}", result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["info", "{model}", "--json"], ["info", "{model}"]])
def test_a_full_disk_on_stdout(model_file: Path, args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        result = gptcli(*[a.format(model=model_file) for a in args], stdout=full)
    _one_error_line(result, "cannot write to stdout: No space left on device")


def _closing(fd: int):
    """Start the child with descriptor `fd` closed, as `cmd >&-` or `cmd <&-` in a shell does."""
    return lambda: os.close(fd)


def test_a_closed_stdout(model_file: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gptcli", "info", str(model_file)], preexec_fn=_closing(1),
                            stderr=subprocess.PIPE, text=True, timeout=120)
    _one_error_line(result, "cannot write to stdout: it is closed")


def test_a_closed_stdin(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gptcli", "prepare", "-", "--out", str(tmp_path / "d")],
                            preexec_fn=_closing(0), capture_output=True, text=True, timeout=120)
    _one_error_line(result, "cannot read <stdin>: standard input is closed")
    assert not (tmp_path / "d").exists()
