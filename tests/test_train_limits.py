"""`train` refuses what cannot fit before anything is allocated or written: the memory estimate
(`gptcli.limits`) against the machine's, with `--ignore-memory-check` (a process-only option, free
on --resume, not in run.json), and --threads within what torch takes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.train import train

from .conftest import VERDICT
from .test_train import tiny_settings

runner = CliRunner()


@pytest.mark.parametrize("option,value", [("--n-layers", str(2**62)), ("--vocab-size", str(2**62)),
                                          ("--emb-dim", str(2**40))])
def test_a_model_that_cannot_fit_is_refused_before_anything_is_built(option, value, tmp_path):
    started = time.monotonic()
    result = runner.invoke(app, ["train", str(VERDICT), "--preset", "tiny", option, value, "--out", str(tmp_path / "r"),
                                 *(["--n-heads", "1"] if option == "--emb-dim" else [])])
    assert time.monotonic() - started < 5
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: training this model (") and result.output.count("\n") == 1
    assert "needs about" in result.output and "pass --ignore-memory-check to try anyway" in result.output
    assert not (tmp_path / "r").exists() and not Path("runs").exists()


def test_threads_out_of_range_is_one_line():
    result = runner.invoke(app, ["train", str(VERDICT), "--preset", "tiny", "--threads", str(2**63 - 1)])
    assert result.exit_code == 2
    assert result.output == f"error: --threads must be between 1 and 4096, got {2**63 - 1}\n"


def test_the_override_is_a_process_option_free_on_resume(monkeypatch, tmp_path):
    import gptcli.limits

    out = tmp_path / "run"
    list(train(tiny_settings(out, max_steps=1)))
    monkeypatch.setattr(gptcli.limits, "available_memory", lambda: 1000)  # a machine with 1 kB
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2", "-q"])
    assert result.exit_code == 2 and "--ignore-memory-check" in result.output
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2", "-q", "--ignore-memory-check"])
    assert result.exit_code == 0, result.output
    assert "ignore_memory_check" not in json.loads((out / "run.json").read_text())
