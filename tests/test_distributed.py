"""Distributed training with 2 real processes on CPU (gloo): launched by torchrun and by
`gptcli train --nproc 2`, it matches one process with the same global batch, and resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.distributed import strip_nproc, torchrun_args
from gptcli.events import Evaluation
from gptcli.prepare import prepare
from gptcli.settings import TrainSettings
from gptcli.tokenizer import get_tokenizer
from gptcli.train import train

from .conftest import BPE_DIR, REPO_ROOT, VERDICT

runner = CliRunner()

# Prepared verdict: 4,630 training tokens; context 64 every 256 tokens makes 18 windows, so 4 steps
# per epoch at batch 4 (2 per process, in 2 accumulation micro-batches of 1). No dropout: its masks
# cannot match between 1 and 2 processes.
ARGS = ["--preset", "tiny", "--context-length", "64", "--stride", "256", "--batch-size", "4", "--drop-rate", "0",
        "--epochs", "2", "--lr", "2e-3", "--eval-freq", "2", "--eval-iter", "2", "--sample-tokens", "4", "--no-plots"]
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(GPTCLI_BPE_DIR=str(BPE_DIR), GPTCLI_HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "gptcli", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=environment(cwd / "home"), capture_output=True, text=True, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The prepared data, one process's run (in-process) and the same run in 2 processes (`--nproc 2`)."""
    root = tmp_path_factory.mktemp("ddp")
    list(prepare([VERDICT], root / "data", tokenizer=get_tokenizer(BPE_DIR)))
    cmd = [sys.executable, "-m", "gptcli", "train", "data", *ARGS, "--micro-batch-size", "1", "--out", "ddp", "--json",
           "--nproc", "2"]
    ddp = subprocess.run(cmd, cwd=root, env=environment(root / "home"), capture_output=True, text=True, timeout=300)

    config = get_preset("tiny").replace(context_length=64, drop_rate=0.0)
    settings = TrainSettings(corpus=str(root / "data"), config=config, out=str(root / "single"), stride=256,
                             batch_size=4, epochs=2, lr=2e-3, eval_freq=2, eval_iter=2, sample_tokens=4, plots=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GPTCLI_BPE_DIR", str(BPE_DIR))
            single = [e.to_dict() for e in train(settings) if isinstance(e, Evaluation)]
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "ddp": ddp, "single": single}


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(runs):
    ddp, root = runs["ddp"], runs["root"]
    assert ddp.returncode == 0, ddp.stderr
    got = metrics(root / "ddp")
    expected = runs["single"]
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [0, 2, 4, 6]
    for a, b in zip(got, expected, strict=True):
        assert a["tokens_seen"] == b["tokens_seen"]  # the batch is global: 4 sequences per step in both
        assert abs(a["train_loss"] - b["train_loss"]) < TOLERANCE and abs(a["val_loss"] - b["val_loss"]) < TOLERANCE
    assert got[-1]["train_loss"] < got[0]["train_loss"]  # it learns
    a, b = load_file(root / "ddp" / "model.safetensors"), load_file(root / "single" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # Only rank 0 prints and writes: one JSON line per evaluation, one header, one sample per epoch.
    assert [json.loads(line) for line in ddp.stdout.splitlines()] == got
    assert ddp.stderr.count("gptcli train data") == 1 and "cpu × 2" in ddp.stderr
    assert ddp.stderr.count("epoch 1 sample:") == 1 and ddp.stderr.count("completed:") == 1
    assert "Traceback" not in ddp.stderr and "OMP_NUM_THREADS" not in ddp.stderr
    assert json.loads((root / "ddp" / "checkpoints" / "latest" / "trainer.json").read_text())["steps_done"] == 8


@pytest.mark.slow
def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    root = runs["root"]
    first = torchrun(root, "data", *ARGS, "--micro-batch-size", "1", "--out", "split", "--max-steps", "3", "--quiet")
    assert first.returncode == 0, first.stderr
    state = json.loads((root / "split" / "checkpoints" / "latest" / "trainer.json").read_text())
    assert state["batch_in_epoch"] == 3  # mid-epoch
    second = torchrun(root, "--resume", "split", "--max-steps", "8", "--json")
    assert second.returncode == 0, second.stderr
    assert [json.loads(line)["step"] for line in second.stdout.splitlines()] == [4, 6]
    assert metrics(root / "split") == metrics(root / "ddp")
    a, b = load_file(root / "ddp" / "model.safetensors"), load_file(root / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nproc_is_stripped_for_the_launcher():
    argv = ["/venv/bin/gptcli", "train", "data", "--nproc", "4", "--epochs", "2", "--nproc=3", "--json"]
    assert strip_nproc(argv) == ["train", "data", "--epochs", "2", "--json"]
    assert torchrun_args(4, argv) == ["--standalone", "--nproc-per-node", "4", "-m", "gptcli", "train", "data",
                                      "--epochs", "2", "--json"]
    result = runner.invoke(app, ["train", str(VERDICT), "--nproc", "0"])
    assert result.exit_code == 2 and "--nproc must be at least 1" in result.output


def test_ranks_other_than_zero_stay_silent_about_errors(monkeypatch):
    """Every rank meets the same bad option; only rank 0 reports it (all exit with its code)."""
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, ["train", str(VERDICT), "--batch-size", "0"])
    assert result.exit_code == 2 and result.output == ""
    monkeypatch.setenv("RANK", "0")
    result = runner.invoke(app, ["train", str(VERDICT), "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size must be at least 1" in result.output


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes in /proc")
def test_a_killed_rank_is_one_line_without_the_survivors_traceback(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "gptcli", "train", str(VERDICT), "--preset", "tiny", "--context-length", "32",
           "--batch-size", "4", "--eval-iter", "1", "--sample-tokens", "0", "--no-plots", "--quiet", "--epochs", "500",
           "--out", "run", "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=environment(tmp_path / "home"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints").is_dir():  # the first checkpoint: both ranks are training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.splitlines()
    assert lines[-1] == "error: training process 1 was killed by SIGKILL" and "Traceback" not in stderr, stderr
    # The launcher's SIGTERM may reach the survivor before its collective fails: at most its stop notice.
    assert all(line.startswith("stopping after this step") for line in lines[:-1]), stderr
    assert proc.returncode == 128 + signal.SIGKILL
