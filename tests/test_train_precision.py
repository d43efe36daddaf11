"""`train --precision`: bf16 only where it is native (simulated with GPTCLI_CPU_BF16), auto, and
what ran recorded in the checkpoint."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from tests.conftest import VERDICT

TINY = ["train", str(VERDICT), "--preset", "tiny", "--context-length", "32", "--max-steps", "1",
        "--sample-tokens", "0", "--no-plots", "--device", "cpu"]


def train(*args: str, quiet: bool = True):
    return CliRunner().invoke(app, [*TINY, *args] + (["--quiet"] if quiet else []))


def ran(out) -> str:
    return json.loads((out / "checkpoints" / "latest" / "trainer.json").read_text())["precision"]


def test_bf16_without_native_support_runs_fp32_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCLI_CPU_BF16", "0")
    result = train("--precision", "bf16", "--out", str(tmp_path / "run"), quiet=False)
    assert result.exit_code == 0, result.output
    assert "--precision bf16: this CPU has no native bf16" in result.output
    assert "running fp32" in result.output
    assert ran(tmp_path / "run") == "fp32"


def test_strict_precision_refuses_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCLI_CPU_BF16", "0")
    result = train("--precision", "bf16", "--strict-precision", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert result.output.startswith("error: --precision bf16: this CPU has no native bf16")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("native,expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_picks_bf16_only_where_native(tmp_path, monkeypatch, native, expected):
    monkeypatch.setenv("GPTCLI_CPU_BF16", native)
    result = train("--precision", "auto", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert ran(tmp_path / "run") == expected
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == "auto"


def test_native_bf16_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCLI_CPU_BF16", "1")
    result = train("--precision", "bf16", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "running fp32" not in result.output
    assert ran(tmp_path / "run") == "bf16"


@pytest.mark.slow
def test_bf16_losses_stay_within_tolerance_of_fp32_over_50_steps(tmp_path, monkeypatch):
    """The same seeded run (dropout, the chapter's AdamW, the fast kernels) in fp32 and in bf16: every
    one of 54 step losses within 2e-2 of fp32's (the bf16 tolerance the GPU check uses too), and it learned."""
    from gptcli.config import get_preset
    from gptcli.events import StepDone
    from gptcli.runtime import BF16_ENV
    from gptcli.settings import TrainSettings
    from gptcli.train import train as run_training

    monkeypatch.setenv(BF16_ENV, "1")  # run bf16 even where it is emulated: small shapes, still quick
    config = get_preset("tiny").replace(context_length=64, emb_dim=64, n_heads=4)
    losses = {}
    for precision in ("fp32", "bf16"):
        settings = TrainSettings(corpus=str(VERDICT), config=config, out=str(tmp_path / precision), batch_size=8,
                                 eval_freq=100, eval_iter=1, sample_tokens=0, epochs=6, lr=1e-3, plots=False,
                                 precision=precision)
        losses[precision] = [e.loss for e in run_training(settings) if isinstance(e, StepDone)]
    assert len(losses["fp32"]) == len(losses["bf16"]) == 54
    gaps = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    assert max(gaps) < 2e-2, f"largest gap {max(gaps):.4f} at step {gaps.index(max(gaps))}"
    assert losses["bf16"][-1] < losses["bf16"][0] - 2
