"""Inputs a system can hand over: file names that are not UTF-8, symbolic link loops and dangling
links, empty files. Each gives a true one-line message or works, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from gptcli.cli import app

runner = CliRunner()
NOT_UTF8 = os.fsdecode(b"\xffname.txt")  # how Python names such a file: a lone surrogate


def _corpus(directory: Path) -> Path:
    directory.mkdir()
    path = directory / NOT_UTF8
    path.write_text("Every effort moves you. " * 40, encoding="utf-8")
    return path


def test_prepare_reads_a_file_whose_name_is_not_utf8(tmp_path: Path) -> None:
    _corpus(tmp_path / "in")
    result = runner.invoke(app, ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)
    assert meta["sources"][0]["path"].endswith("\\xffname.txt")
    assert json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))["tokens"] == meta["tokens"]


def test_symbolic_link_loops_and_dangling_links_are_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    model = tmp_path / "m.safetensors"
    gone = f"points at {tmp_path / 'nothing'}, which does not exist"
    for name, says in (("a", "is a symbolic link loop"), ("dangling", gone)):
        path = str(tmp_path / name)
        for args in (["prepare", path, "--out", str(tmp_path / "o")], ["train", path], ["sample", "--model", path],
                     ["eval", path, "--model", str(model)], ["convert", path], ["info", path]):
            result = runner.invoke(app, args)
            assert result.exit_code in (1, 2) and says in result.stderr, (args, result.output)
            assert result.stderr.count("\n") == 1, result.stderr


def test_a_missing_input_with_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", str(tmp_path / NOT_UTF8), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr == f"error: input not found: {tmp_path}/\\xffname.txt\n"


def test_an_empty_file_is_bad_input_like_an_empty_stdin(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(app, ["eval", str(tmp_path / "empty.txt")])
    assert result.exit_code == 2 and "is empty" in result.stderr
    result = runner.invoke(app, ["eval", "-"], input="")
    assert result.exit_code == 2 and "stdin is empty" in result.stderr
