"""Hostile input across commands: one line `error: ...`, the right exit code, never a traceback, and
checked before any work (issue 10, validation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import GPTConfig, get_preset
from gptcli.errors import GptcliError
from gptcli.model import GPT
from gptcli.modelfile import load_config, load_model, save_model
from tests.conftest import VERDICT

runner = CliRunner()
TINY = get_preset("tiny")


def invoke(*args: str | Path, input: str | bytes | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(result, exit_code: int) -> str:
    """The result failed with `exit_code` and said so in one `error: ...` line; that line."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, GPT(TINY))
    return path


def forge(model_file: Path, out: Path, config_text: str) -> Path:
    """`model_file`'s tensors under different config metadata."""
    save_file(load_file(str(model_file)), str(out), metadata={"format": "gptcli", "config": config_text})
    return out


# --- 1. one shared number check -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,option,value",
    [
        (["sample", "--temperature", "nan"], "--temperature", "nan"),
        (["sample", "--top-p", "inf"], "--top-p", "inf"),
        (["sample", "--length-penalty", "-inf"], "--length-penalty", "-inf"),
        (["prepare", "x.txt", "--out", "d", "--val-ratio", "nan"], "--val-ratio", "nan"),
        (["fetch", "verdict", "--timeout", "inf"], "--timeout", "inf"),
        (["fetch", "verdict", "--backoff", "inf"], "--backoff", "inf"),
        (["train", "--lr", "nan"], "--lr", "nan"),
        (["train", "--drop-rate", "1e999"], "--drop-rate", "inf"),
    ],
)
def test_non_finite_numbers_are_refused_by_every_command(args: list[str], option: str, value: str) -> None:
    result = invoke(*args)
    assert one_error_line(result, 2) == f"error: {option} must be a finite number, got {value}"
    assert not Path("d").exists() and not Path("runs").exists()  # refused before anything ran


def test_int_options_must_fit_64_bits() -> None:
    line = one_error_line(invoke("sample", "--seed", str(2**64)), 2)
    assert line.startswith("error: --seed must fit in 64 bits")


def test_the_check_reaches_commands_added_later() -> None:
    import typer

    from gptcli.cli import OneLineErrorsGroup

    later = typer.Typer(cls=OneLineErrorsGroup)
    later.command("a")(lambda: None)  # a second command, so `b` is a subcommand as in gptcli

    @later.command("b")
    def b(scale: float = typer.Option(1.0, "--scale")) -> None:
        print("ran")

    result = runner.invoke(later, ["b", "--scale", "nan"])
    assert one_error_line(result, 2) == "error: --scale must be a finite number, got nan"
    assert "ran" not in result.output


# --- 2. Typer's usage errors as one line ----------------------------------------------------------


@pytest.mark.parametrize(
    "args,expected",
    [
        (["fetch", "nosuchthing"], "'nosuchthing' is not one of 'verdict', 'tokenizer', 'gpt2'"),
        (["convert", "x", "--to", "nosuch"], "'nosuch' is not one of 'gptcli', 'hf'"),
        (["sample", "--max-new-tokens", "abc"], "--max-new-tokens"),
        (["eval", "--bogus"], "No such option: --bogus"),
        (["nosuch"], "No such command 'nosuch'"),
        (["prepare"], "Missing argument"),
        (["fetch", "verdict", "--retries", "-1"], "--retries"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], expected: str) -> None:
    assert expected in one_error_line(invoke(*args), 2)


def test_usage_error_in_a_real_process_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gptcli", "fetch", "nosuchthing"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: Invalid value for 'WHAT': 'nosuchthing' is not one of 'verdict', 'tokenizer', 'gpt2'. "
        "(see `gptcli fetch --help`)"
    ]


def test_help_still_works_and_imports_no_torch() -> None:
    code = (
        "import sys\nfrom gptcli.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('exit', code, 'torch' in sys.modules, 'numpy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "exit 0 False False"
    assert "sample" in result.stdout and "one line" in result.stdout
    bare = subprocess.run([sys.executable, "-m", "gptcli"], capture_output=True, text=True, timeout=60)
    assert "Usage" in bare.stdout + bare.stderr and "error:" not in bare.stderr


# --- 3. model files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_text,expected",
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        (json.dumps({**TINY.to_dict(), "emb_dim": "32"}), "field emb_dim must be an integer, got '32'"),
        (json.dumps({**TINY.to_dict(), "qkv_bias": 1}), "field qkv_bias must be true or false"),
        (json.dumps({**TINY.to_dict(), "colour": "blue"}), "unknown model config field(s): colour"),
        (json.dumps({**TINY.to_dict(), "vocab_size": 1000}), "tok_emb.weight has shape [50257, 32]"),
    ],
)
def test_bad_model_metadata_is_one_line_naming_the_file(
    model_file: Path, tmp_path: Path, config_text: str, expected: str
) -> None:
    bad = forge(model_file, tmp_path / "bad.safetensors", config_text)
    for command in (["sample", "-m", bad, "hi"], ["eval", "-m", bad, VERDICT], ["convert", bad, "--out", "o"]):
        line = one_error_line(invoke(*command), 1)
        assert line.startswith(f"error: {bad}") and expected in line, line
    with pytest.raises(GptcliError, match=f"^{bad}"):
        load_config(bad)  # what `train --init` reads


def test_lying_config_fails_before_allocating(model_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A 13 MB file claiming 200 layers of width 4096 (about 40 GB) is refused from its header."""
    huge = {**TINY.to_dict(), "emb_dim": 4096, "n_layers": 200, "n_heads": 32}
    bad = forge(model_file, tmp_path / "huge.safetensors", json.dumps(huge))
    built = []
    monkeypatch.setattr(GPT, "__init__", lambda self, *a: built.append(a) or 1 / 0)
    with pytest.raises(GptcliError, match="does not match its tensors"):
        load_model(bad)
    assert built == []  # the model was never constructed
    line = one_error_line(invoke("sample", "-m", bad), 1)
    assert "200 layers, emb_dim 4096" in line


@pytest.mark.parametrize("content", [b"", b"not a model at all" * 4, None])
def test_unreadable_model_files(model_file: Path, tmp_path: Path, content: bytes | None) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(model_file.read_bytes()[:-64] if content is None else content)  # None: truncated
    line = one_error_line(invoke("sample", "-m", bad, "hi"), 1)
    assert line.startswith(f"error: {bad} is not a readable safetensors file")


def test_config_from_dict_types() -> None:
    assert GPTConfig.from_dict({"drop_rate": 0}).drop_rate == 0.0  # JSON's 0 is a fine float
    with pytest.raises(GptcliError, match="n_layers must be an integer, got True"):
        GPTConfig.from_dict({"n_layers": True})
    with pytest.raises(GptcliError, match="drop_rate must be a finite number"):
        GPTConfig.from_json('{"drop_rate": NaN}')


# --- 4. token ids beyond the vocabulary -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("v1000") / "model.safetensors"
    save_model(path, GPT(TINY.replace(vocab_size=1000)))
    return path


def test_eval_of_ids_beyond_the_vocabulary(small_vocab_model: Path) -> None:
    line = one_error_line(invoke("eval", "-m", small_vocab_model, input="Every effort moves you forward\n"), 2)
    assert line.startswith("error: <stdin> holds token id ") and "the model's vocabulary of 1,000 ids" in line


def test_prepared_data_with_ids_beyond_its_vocabulary(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert invoke("prepare", VERDICT, "--out", data, "-q").exit_code == 0
    ids = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    ids[5] = 60000  # fits uint16, not GPT-2's 50257 ids
    ids.flush()
    del ids
    line = one_error_line(invoke("train", data, "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "r"), 2)
    assert "train.bin holds token id 60,000" in line and "meta.json's vocabulary of 50,257" in line
    meta = json.loads((data / "meta.json").read_text())
    (data / "train.bin").write_bytes(np.zeros(meta["train"]["tokens"], dtype=np.uint16).tobytes())
    meta["vocab_size"] = 10  # smaller than the ids in val.bin
    (data / "meta.json").write_text(json.dumps(meta))
    line = one_error_line(invoke("train", data, "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "r"), 2)
    assert "val.bin holds token id" in line and "meta.json's vocabulary of 10 ids" in line
    assert not (tmp_path / "r" / "model.safetensors").exists()


# --- 5. invalid UTF-8 on stdin --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["sample"], ["sample", "-"], ["eval"], ["eval", "-"]])
def test_invalid_utf8_on_stdin(model_file: Path, command: list[str]) -> None:
    line = one_error_line(invoke(*command, "-m", model_file, input=b"caf\xe9 au lait\n"), 1)
    assert line == "error: <stdin> is not UTF-8 text (invalid byte 0xe9 at offset 3)"


def test_invalid_utf8_on_stdin_of_a_real_process(model_file: Path) -> None:
    """Python's own stdin decoding lets bad bytes through (surrogateescape under a C locale)."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONIOENCODING": ""}
    for command in (["sample", "-m", str(model_file)], ["prepare", "-", "--out", "d"]):
        result = subprocess.run([sys.executable, "-m", "gptcli", *command], input=b"caf\xe9\n",
                                capture_output=True, env=env, timeout=120)
        assert result.returncode == 1
        assert b"error: <stdin> is not UTF-8 text (invalid byte 0xe9 at offset 3)" in result.stderr


# --- 6.-8. convert --force, fetch --mirror, permissions -------------------------------------------


def test_convert_to_hf_into_a_non_empty_directory_needs_force(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    line = one_error_line(invoke("convert", model_file, "--to", "hf", "--out", out), 2)
    assert f"{out} is not empty; pass --force" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = invoke("convert", model_file, "--to", "hf", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


@pytest.mark.parametrize("mirror", ["ftp://example.com/gpt2", "gopher://example.com"])
def test_unsupported_mirror_scheme(mirror: str) -> None:
    line = one_error_line(invoke("fetch", "verdict", "--mirror", mirror, "--out", "v.txt"), 2)
    scheme = mirror.split(":")[0]
    assert line == (f"error: mirror {mirror}: the {scheme}:// scheme is not supported; use an http:// or "
                    "https:// URL or a local directory")


def test_file_mirror_is_a_directory(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_bytes(VERDICT.read_bytes())
    result = invoke("fetch", "verdict", "--mirror", f"file://{mirror}", "--out", "v.txt")
    assert result.exit_code == 0, result.output
    assert Path("v.txt").read_bytes() == VERDICT.read_bytes()


def test_written_files_follow_the_umask(model_file: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_bytes(VERDICT.read_bytes())
    old = os.umask(0o022)
    try:
        commands = [
            ["convert", model_file, "--out", "conv/m.safetensors"],
            ["convert", model_file, "--to", "hf", "--out", "hf"],
            ["prepare", VERDICT, "--out", "data", "-q"],
            ["fetch", "verdict", "--mirror", mirror, "--out", "fetched/v.txt"],
        ]
        for command in commands:
            assert invoke(*command).exit_code == 0, command
    finally:
        os.umask(old)
    written = [p for p in Path().rglob("*") if p.is_file()]
    assert len(written) == 7
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in written} == {str(p): "0o644" for p in written}
    assert oct(Path("hf").stat().st_mode & 0o777) == "0o755"


# --- 9. other hostile input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,code,expected",
    [
        (["sample", "--beam-width", "2", "--length-penalty", "1e300", "-n", "2"], 2, "--length-penalty must be"),
        (["sample", "-n", "-5"], 2, "--max-new-tokens must not be negative"),
        (["sample", "--top-p", "1.5", "-t", "1"], 2, "--top-p must be in (0, 1]"),
        (["sample", "--beam-width", "2", "-t", "0.7"], 2, "beam search"),
        (["eval", "no-such.txt"], 1, "not found: no-such.txt"),
        (["eval", "."], 1, ". is a directory"),
    ],
)
def test_hostile_options(model_file: Path, args: list[str], code: int, expected: str) -> None:
    assert expected in one_error_line(invoke(args[0], "-m", model_file, *args[1:]), code)


def test_a_file_where_a_directory_should_be(model_file: Path) -> None:
    Path("blocker").write_text("x")
    for command in (
        ["convert", model_file, "--out", "blocker/m.safetensors"],
        ["prepare", VERDICT, "--out", "blocker/data"],
        ["fetch", "verdict", "--out", "blocker/v.txt"],
    ):
        line = one_error_line(invoke(*command), 2)
        assert line.endswith("blocker is a file, not a directory"), line


def test_a_closed_pipe_exits_quietly(model_file: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n" * 3000)
    script = (f"{sys.executable} -m gptcli sample -m {model_file} -n 2 --each-line - < {prompts} | head -1; "
              "echo status ${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "status 141", result.stderr
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower()
