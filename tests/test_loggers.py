"""`gptcli train --logger`: TensorBoard, W&B (offline) and CSV, read back from the files the real
libraries wrote and compared with metrics.jsonl; resume continues the same logs without duplicated
steps; a missing extra is one line and exit 2 before anything is written; under DDP only rank 0 logs."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.loggers import Loggers, wandb_mode

from .conftest import BPE_DIR, REPO_ROOT, VERDICT

runner = CliRunner()
# 72 windows of 64 tokens at batch 8: 9 steps per epoch; evaluations at steps 0, 3, 6; the sample at step 8.
TINY_ARGS = ["--preset", "tiny", "--context-length", "64", "--batch-size", "8", "--eval-freq", "3",
             "--eval-iter", "2", "--sample-tokens", "5", "--no-plots"]
EVAL_KEYS = ("tokens_seen", "train_loss", "val_loss", "train_ppl", "val_ppl", "lr")


def train_cli(*args: str):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- TensorBoard ----------------------------------------------------------------------------------


def tensorboard(run: Path):
    """The run's TensorBoard logs as TensorBoard reads them (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.mark.slow
def test_tensorboard_logs_the_evaluations_steps_and_sample(tmp_path):
    run = tmp_path / "run"
    result = train_cli(str(VERDICT), *TINY_ARGS, "--epochs", "1", "--out", str(run), "--logger", "tensorboard",
                       "--json")
    assert [json.loads(line) for line in result.stdout.splitlines()] == metrics(run)  # stdout stays JSON
    logs, evaluations = tensorboard(run), metrics(run)
    assert [m["step"] for m in evaluations] == [0, 3, 6]
    for key in EVAL_KEYS:  # TensorBoard stores float32
        assert scalars(logs, f"eval/{key}") == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in evaluations]
    for tag in ("train/loss", "train/lr", "train/tokens_per_second", "train/grad_norm", "train/tokens_seen"):
        assert [step for step, _ in scalars(logs, tag)] == list(range(9)), tag
    assert all(value > 0 for _, value in scalars(logs, "train/grad_norm"))
    assert scalars(logs, "train/tokens_seen")[-1] == (8, 9 * 8 * 64)
    [sample] = logs.Tensors("sample/text_summary")
    assert sample.step == 8
    text = sample.tensor_proto.string_val[0].decode()
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you")
    assert str(run / "tensorboard") in result.output.replace("\n", "")  # in the summary's files


@pytest.mark.slow
def test_resume_continues_the_tensorboard_log_without_duplicated_steps(tmp_path):
    """A checkpoint at step 5, then events past it as a killed process leaves them: the resumed run's
    purge_step hides them, and every step is there once, with the resumed run's values."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    train_cli(str(VERDICT), *TINY_ARGS, "--max-steps", "5", "--out", str(run), "--logger", "tensorboard")
    killed = SummaryWriter(str(run / "tensorboard"))
    for step in (5, 6, 7):
        killed.add_scalar("train/loss", 999.0, step)
    killed.add_scalar("eval/val_loss", 999.0, 6)
    killed.close()
    # The loggers may change on --resume: csv now as well (it holds the evaluations from before too).
    train_cli("--resume", str(run), "--max-steps", "9", "--logger", "tensorboard", "--logger", "csv", "-q")
    logs, evaluations = tensorboard(run), metrics(run)
    losses = scalars(logs, "train/loss")
    assert [step for step, _ in losses] == list(range(9))
    assert all(value < 100 for _, value in losses)
    assert scalars(logs, "eval/val_loss") == [(m["step"], pytest.approx(m["val_loss"], rel=1e-6)) for m in evaluations]
    assert [m["step"] for m in evaluations] == [0, 3, 6]
    assert [int(row["step"]) for row in csv_rows(run / "metrics.csv")] == [0, 3, 6]
    assert "logger" not in json.loads((run / "run.json").read_text())  # not a setting of the run


# --- CSV ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_csv_rows_equal_metrics_jsonl_and_resume_cuts_them_back(tmp_path):
    run = tmp_path / "run"
    train_cli(str(VERDICT), *TINY_ARGS, "--max-steps", "5", "--out", str(run), "--logger", "csv", "-q")
    first_steps = csv_rows(run / "steps.csv")
    assert [int(row["step"]) for row in first_steps] == list(range(5))
    # What a process killed after the checkpoint leaves: rows past step 5, the last one cut short.
    with open(run / "metrics.csv", "a") as handle:
        handle.write("1,6,3584,999,999,999,999,0.0004\n")
    with open(run / "steps.csv", "a") as handle:
        handle.write("1,5,3072,999,0.0004,1000,0.5\n1,6,3584,99")
    train_cli("--resume", str(run), "--max-steps", "9", "--logger", "csv", "-q")
    rows, evaluations = csv_rows(run / "metrics.csv"), metrics(run)
    assert list(rows[0]) == list(evaluations[0])  # metrics.jsonl's columns, in its order
    assert [{k: float(v) for k, v in row.items()} for row in rows] == evaluations
    steps = csv_rows(run / "steps.csv")
    assert [int(row["step"]) for row in steps] == list(range(9))
    assert steps[:5] == first_steps and all(float(row["loss"]) < 100 for row in steps)
    assert set(steps[0]) == {"epoch", "step", "tokens_seen", "loss", "lr", "tokens_per_second", "grad_norm"}


# --- W&B ------------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a .wandb file (W&B's transaction log: LevelDB's log format of 32 KiB blocks,
    after a 7-byte header; each record a wandb_internal_pb2.Record, maybe split across blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # the block's tail, too short for a record header, is padding
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows logged to one offline W&B run directory, with their values decoded."""
    [log] = run_dir.glob("run-*.wandb")
    rows = []
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> dict[str, str]:
    """No API key and no WANDB_MODE (so gptcli picks offline), and W&B's own files in the tmp dir."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                         ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return dict(os.environ, OMP_NUM_THREADS="1")


def gptcli_train(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """A separate process, so that W&B's service and global state stay out of the test process,
    bounded by a timeout should W&B wait on the network."""
    result = subprocess.run([sys.executable, "-m", "gptcli", "train", *args], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_wandb_offline_logs_metrics_and_resume_keeps_the_run_id(tmp_path, wandb_env):
    run = tmp_path / "run"
    gptcli_train(wandb_env, str(VERDICT), *TINY_ARGS, "--max-steps", "5", "--out", str(run), "--logger", "wandb")
    run_id = (run / "wandb-run-id").read_text().strip()
    gptcli_train(wandb_env, "--resume", str(run), "--max-steps", "9", "--logger", "wandb")
    assert (run / "wandb-run-id").read_text().strip() == run_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in offline] == [run_id, run_id]  # one W&B run, resumed
    first, resumed = wandb_history(offline[0]), wandb_history(offline[1])
    assert [row["_step"] for row in first] == [0, 1, 2, 3, 4]
    assert [row["_step"] for row in resumed] == [5, 6, 7, 8]
    rows = first + resumed
    evaluations = [row for row in rows if "eval/val_loss" in row]
    assert [row["_step"] for row in evaluations] == [m["step"] for m in metrics(run)] == [0, 3, 6]
    for row, expected in zip(evaluations, metrics(run), strict=True):
        assert {key: row[f"eval/{key}"] for key in EVAL_KEYS} == {key: expected[key] for key in EVAL_KEYS}
    assert all({"train/loss", "train/lr", "train/tokens_per_second", "train/grad_norm"} <= set(row) for row in rows)
    assert rows[-1]["sample/_type"] == "html-file"  # the epoch's sample, at step 8


def test_wandb_mode_follows_the_environment(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() is None  # online: W&B's default
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() is None  # the user's choice, read by wandb itself


def test_wandb_disabled_by_the_user_writes_nothing(tmp_path, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    train_cli(str(VERDICT), *TINY_ARGS, "--max-steps", "2", "--out", str(run), "--logger", "wandb", "-q")
    assert not (run / "wandb").exists() and not (run / "wandb-run-id").exists()
    assert [m["step"] for m in metrics(run)] == [0]


# --- missing extras, the sink interface, DDP -------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_and_writes_nothing(tmp_path, monkeypatch, kind):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == kind else real(name, *args))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(VERDICT), *TINY_ARGS, "--out", str(run), "--logger", "csv",
                                 "--logger", kind])
    assert result.exit_code == 2
    assert result.output == f"error: --logger {kind} needs the {kind} package: pip install 'gptcli[{kind}]'\n"
    assert not run.exists() and not Path("runs").exists()


def test_loggers_open_on_run_started_and_close_every_sink(tmp_path):
    """A sink that fails to close does not keep the others open."""
    from gptcli import loggers

    closed = []

    class Failing:
        files: list[Path] = []

        def __init__(self, started, quiet):
            self.name = started

        def handle(self, event):
            pass

        def close(self):
            closed.append(self.name)
            raise OSError("disk full")

    sinks = Loggers(["csv", "csv"])  # a repeated kind is one sink
    assert sinks.kinds == ["csv"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(loggers.SINKS, "csv", Failing)
        patch.setitem(loggers.SINKS, "tensorboard", Failing)
        sinks = Loggers(["csv", "tensorboard"])
        sinks.handle(_started(tmp_path))
        with pytest.raises(OSError):
            sinks.close()
    assert len(closed) == 2


def _started(run: Path):
    from gptcli.config import get_preset
    from gptcli.events import RunStarted
    from gptcli.settings import TrainSettings

    settings = TrainSettings(corpus=str(VERDICT), config=get_preset("tiny"))
    return RunStarted(out_dir=run, device="cpu", config=settings.config, parameters=1, train_tokens=1, val_tokens=1,
                      steps_per_epoch=1, total_steps=1, start_step=0, world_size=1, settings=settings,
                      precision="fp32")


@pytest.mark.slow
def test_under_ddp_only_rank_zero_logs(tmp_path):
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(GPTCLI_BPE_DIR=str(BPE_DIR), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    run = tmp_path / "run"
    # --standalone: torchrun picks a free port itself (no race with other tests for one picked here).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gptcli",
           "train", str(VERDICT), *TINY_ARGS, "--max-steps", "4", "--out", str(run),
           "--logger", "csv", "--logger", "tensorboard", "-q"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    assert [int(row["step"]) for row in csv_rows(run / "steps.csv")] == [0, 1, 2, 3]
    assert [int(row["step"]) for row in csv_rows(run / "metrics.csv")] == [m["step"] for m in metrics(run)] == [0, 3]
