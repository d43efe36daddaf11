"""`train`'s one stop policy, with real processes: SIGHUP as SIGTERM (exit 129), stdout lost to a
reader that left (exit 141), a stop before training started (abort at once, nothing left), and a
second signal's message saying what is really kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gptcli.cli import app

from .conftest import VERDICT
from .test_reliability import TINY, committed_step, subprocess_env

runner = CliRunner()


def test_the_policy_in_process():
    from gptcli.commands.train import _StopSignals

    with _StopSignals(announce=False) as stop:
        with pytest.raises(KeyboardInterrupt):  # before the first step: abort at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exit_code() == 143
    with _StopSignals(announce=False) as stop:
        stop.started = True
        os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed: stop after this step
        assert stop.requested == signal.SIGHUP and stop.exit_code() == 129
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


@pytest.mark.slow
def test_a_reader_that_leaves_stops_the_run_with_a_checkpoint(tmp_path):
    """`gptcli train --json ... | head -1`: the run stops, saved, with exit 141 (as SIGPIPE)."""
    out = tmp_path / "run"
    args = " ".join([sys.executable, "-m", "gptcli", "train", str(VERDICT), *TINY, "--epochs", "500",
                     "--eval-freq", "2", "--json", "--out", str(out)])
    done = subprocess.run(["bash", "-c", f"{args} | head -1; echo ${{PIPESTATUS[0]}} >&2"], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert done.stdout.count("\n") == 1 and '"val_loss"' in done.stdout
    assert done.stderr.splitlines()[-1] == "141", done.stderr
    assert "stdout was closed; continue with: gptcli train --resume" in done.stderr
    assert "Traceback" not in done.stderr and "error:" not in done.stderr
    assert committed_step(out) >= 1
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", str(committed_step(out) + 1), "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_sigterm_while_the_model_is_built_aborts_at_once(tmp_path):
    out = tmp_path / "big"  # 355M parameters: seconds to build on a CPU
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", "train", str(VERDICT), "--preset", "355M",
                             "--batch-size", "1", "--sample-tokens", "0", "--no-plots", "--quiet", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.monotonic() + 120
    while not ((out / ".lock").exists() and (out / ".lock").read_text()):  # the run directory is opened
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr == "error: stopped before training started; no checkpoint was saved\n"
    assert time.monotonic() - signalled < 10
    assert not out.exists()  # the new run directory, without a checkpoint, is removed


@pytest.mark.parametrize("at_step,save_every,says", [
    (0, [], "aborted; no checkpoint was saved"),
    (2, ["--save-every", "1"], "aborted; the last committed checkpoint (step 2) is kept; continue with: "
                               "gptcli train --resume {out}"),
])
def test_a_second_signal_says_what_is_really_kept(monkeypatch, tmp_path, at_step, save_every, says):
    import gptcli.train

    norm, calls = gptcli.train.gradient_norm, []

    def two_signals_in_a_step(*args):
        if len(calls) == at_step:  # real signals, one after the other (the kernel would merge two at once)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return norm(*args)

    monkeypatch.setattr(gptcli.train, "gradient_norm", two_signals_in_a_step)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(VERDICT), *TINY, "--out", str(out), *save_every])
    assert result.exit_code == 143
    assert result.output.splitlines()[-1] == "error: " + says.format(out=out)
    assert out.exists() == bool(save_every)
