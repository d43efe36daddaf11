"""One output-path policy for every command that writes a file: a new path, or an existing regular
file with --force; never a device, pipe or socket; and the temporary files of a killed process are
removed by the next run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from tests.conftest import VERDICT

runner = CliRunner()


def _special_files(tmp_path: Path) -> list[Path]:
    """A FIFO, and (as root) a character device equal to /dev/null, made in the test's directory."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [fifo]
    try:
        os.mknod(tmp_path / "chardev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        paths.append(tmp_path / "chardev")
    except PermissionError:
        pass
    return paths


def _unchanged(path: Path, kind: int) -> bool:
    return stat.S_IFMT(path.lstat().st_mode) == kind


def test_convert_never_replaces_a_device_or_a_pipe(model_file: Path, tmp_path: Path) -> None:
    for special in _special_files(tmp_path):
        kind = stat.S_IFMT(special.lstat().st_mode)
        result = runner.invoke(app, ["convert", str(model_file), "--to", "book", "--out", str(special), "--force"])
        assert result.exit_code == 2, result.output
        assert "is not a regular file" in result.stderr and result.stderr.count("\n") == 1
        assert _unchanged(special, kind)


def test_fetch_never_replaces_a_device_or_a_pipe(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").symlink_to(VERDICT)
    for special in _special_files(tmp_path):
        kind = stat.S_IFMT(special.lstat().st_mode)
        result = runner.invoke(app, ["fetch", "verdict", "--mirror", str(mirror), "--out", str(special)])
        assert result.exit_code == 2 and "is not a regular file" in result.stderr, result.output
        assert _unchanged(special, kind)


def test_convert_replaces_an_existing_file_only_with_force(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "book.safetensors"
    out.write_text("precious")
    result = runner.invoke(app, ["convert", str(model_file), "--to", "book", "--out", str(out)])
    assert result.exit_code == 2 and f"--out {out} exists; pass --force to replace it" in result.stderr
    assert out.read_text() == "precious"
    result = runner.invoke(app, ["convert", str(model_file), "--to", "book", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_rerun_removes_what_a_killed_convert_left(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.gptcli-{_dead_pid()}.tmp"
    stale.write_bytes(b"\0" * 4096)  # as after a kill -9 part-way through the write
    live = tmp_path / f".m.gguf.gptcli-{os.getppid()}.tmp"  # a running process's: left alone
    live.write_bytes(b"\0")
    result = runner.invoke(app, ["convert", str(model_file), "--to", "gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")) == [live.name]


@pytest.mark.parametrize("to", ["hf"])
def test_a_rerun_removes_a_killed_conversions_directory(model_file: Path, tmp_path: Path, to: str) -> None:
    stale = tmp_path / f".hf.gptcli-{_dead_pid()}.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    result = runner.invoke(app, ["convert", str(model_file), "--to", to, "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (tmp_path / "hf" / "config.json").is_file()
