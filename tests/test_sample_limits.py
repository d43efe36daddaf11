"""Issue 19: sampling numerics (tiny temperatures, non-finite logits), resource limits checked before
the weights load (`sample`, `eval`), and clear lines for files that are not model files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.errors import GptcliError
from gptcli.model import GPT
from gptcli.modelfile import save_model
from gptcli.sampling import DecodeSettings, next_tokens, sampling_probs
from tests.test_cli_errors import one_error_line

runner = CliRunner()
HUGE = str(2**63 - 1)


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def nan_model(tmp_path: Path) -> Path:
    model = GPT(get_preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_model(path, model)
    return path


# --- 1. sampling numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-39])
def test_tiny_temperatures_pick_the_argmax(temperature: float) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [-5.0, -7.0, -6.0, -9.0]])
    settings = DecodeSettings(temperature=temperature, top_k=3, top_p=0.9)
    probs = sampling_probs(logits, settings)
    assert probs is not None and bool(torch.isfinite(probs).all())
    generator = torch.Generator().manual_seed(0)
    assert next_tokens(logits, probs, [generator, generator]).view(-1).tolist() == [1, 0]


def test_ordinary_temperatures_are_unchanged() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    probs = sampling_probs(logits, DecodeSettings(temperature=0.7))
    assert torch.equal(probs, torch.softmax(logits / 0.7, dim=-1))  # type: ignore[arg-type]


def test_sample_with_a_tiny_temperature_is_greedy(model_file: Path) -> None:
    greedy = invoke("sample", "hi", "-m", model_file, "-n", "8", "--completion-only")
    tiny = invoke("sample", "hi", "-m", model_file, "-n", "8", "--completion-only", "--temperature", "1e-45")
    assert greedy.exit_code == 0 and tiny.exit_code == 0, tiny.output
    assert tiny.stdout == greedy.stdout


@pytest.mark.parametrize("extra", [[], ["--temperature", "0.8"], ["--beam-width", "2"], ["--stream"]])
def test_nan_weights_are_one_line(nan_model: Path, extra: list[str]) -> None:
    line = one_error_line(invoke("sample", "hi", "-m", nan_model, "-n", "3", *extra), 1)
    assert line.startswith("error: the model produced non-finite logits (NaN/inf): ")


def test_the_engine_refuses_non_finite_logits_for_every_caller(nan_model: Path) -> None:
    from gptcli.generate import generate
    from gptcli.modelfile import load_model

    model, _ = load_model(nan_model)
    with pytest.raises(GptcliError, match="non-finite logits"):
        generate(model, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(GptcliError, match="non-finite logits"):
        generate(model, [1, 2, 3], max_new_tokens=2, beam_width=2)


# --- 2. resource limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--beam-width", HUGE], "needs about"),
        (["--batch-size", HUGE, "--num-samples", HUGE, "-t", "1"], "needs about"),
        (["--max-new-tokens", HUGE], "needs about"),
        (["--threads", HUGE], "--threads must be between 1 and 4096"),
        (["--threads", "0"], "--threads must be between 1 and 4096"),
    ],
)
def test_huge_sample_options_are_refused_before_loading(model_file: Path, args: list[str], needle: str) -> None:
    started = time.perf_counter()
    result = invoke("sample", "hi", "-m", model_file, *args)
    line = one_error_line(result, 2)
    assert needle in line and ("--ignore-memory-check" in line or "threads" in line)
    assert "loaded in" not in result.stderr  # refused before the weights were read
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("args", [["--batch-size", HUGE], ["--threads", HUGE]])
def test_huge_eval_options_are_refused_before_loading(model_file: Path, tmp_path: Path, args: list[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Every effort moves you forward, one step at a time. " * 2000)
    started = time.perf_counter()
    result = invoke("eval", text, "-m", model_file, *args)
    one_error_line(result, 2)
    assert "loaded in" not in result.stderr and time.perf_counter() - started < 10


def test_a_small_eval_text_with_a_huge_batch_size_runs(model_file: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("Every effort moves you forward.")
    assert invoke("eval", text, "-m", model_file, "--batch-size", HUGE).exit_code == 0  # 1 window at once


def test_the_override_skips_the_check(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gptcli import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1)
    one_error_line(invoke("sample", "hi", "-m", model_file, "-n", "2"), 2)
    result = invoke("sample", "hi", "-m", model_file, "-n", "2", "--ignore-memory-check")
    assert result.exit_code == 0, result.output


def test_a_huge_num_samples_streams_without_listing_its_rows(model_file: Path) -> None:
    """2**63 - 1 samples are an endless stream (with bounded memory), not a list made first."""
    command = [sys.executable, "-m", "gptcli", "sample", "hi", "-m", str(model_file), "-n", "1",
               "--num-samples", HUGE, "--each-line", "-t", "1", "--seed", "0"]
    env = {**os.environ, "GPTCLI_THREADS": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(20)]
        finally:
            process.kill()
    assert all(line.startswith(b"hi") for line in lines), lines


# --- 3. files that are not model files ------------------------------------------------------------


def test_a_gguf_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(200))
    for command in (["sample", "hi"], ["eval", str(tmp_path / "x.txt")]):
        (tmp_path / "x.txt").write_text("some text to score here")
        line = one_error_line(invoke(*command, "-m", path), 1)
        assert f"{path} is a GGUF file (llama.cpp's format)" in line
        assert "reads only safetensors model files" in line and "header too large" not in line


def test_an_empty_model_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    assert one_error_line(invoke("sample", "hi", "-m", path), 1) == (
        f"error: {path} is not a readable safetensors file (it is empty: 0 bytes; was it written completely?)"
    )
