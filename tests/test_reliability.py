"""Training never loses a run: kill -9 at every step of a save, signals, the run lock, divergence,
validation before anything is written, corrupt files, a full disk, strict JSON."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gptcli import jsonio
from gptcli.cli import app

from .conftest import REPO_ROOT, VERDICT

runner = CliRunner()
LATEST = Path("checkpoints") / "latest"
# A tiny run (tied head: 6 MB of weights) with a checkpoint after every step and two evaluations.
SWEEP_ARGS = ["--preset", "tiny", "--context-length", "32", "--tie-weights", "--batch-size", "2", "--eval-freq", "3",
              "--eval-iter", "1", "--sample-tokens", "0", "--no-plots", "--save-every", "1", "--max-steps", "4",
              "--quiet"]
# Save points (rundir.save_point) per save: 3 files x (write, fsync), the directory's fsync, the
# rename, the commit; the first save links the top-level model file, later ones prune (2 points).
POINTS_FIRST_SAVE, POINTS_LATER_SAVE = 10, 11
TINY = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--eval-iter", "1", "--sample-tokens", "0",
        "--no-plots", "--quiet"]


def cli(*args: str):
    return runner.invoke(app, ["train", str(VERDICT), *args])


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def fork_jobs(jobs: list[dict], cwd: Path) -> list[dict]:
    script = REPO_ROOT / "tests" / "forkrun.py"
    done = subprocess.run([sys.executable, str(script), json.dumps(jobs)], capture_output=True, text=True,
                          cwd=cwd, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def weights_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def assert_same_weights(got, expected, label) -> None:
    """Bit for bit: every tensor equal, the same metadata (safetensors orders its keys per process)."""
    assert got[1] == expected[1], label
    assert got[0].keys() == expected[0].keys(), label
    for name, tensor in expected[0].items():
        assert torch.equal(got[0][name], tensor), (label, name)


def no_leftovers(run: Path) -> bool:
    names = {p.name for p in (run / "checkpoints").iterdir()}
    return names == {"latest", os.readlink(run / LATEST)} and not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_9_at_every_save_point_then_resume_equals_an_uninterrupted_run(tmp_path):
    # The runs live on tmpfs when there is one: a SIGKILL leaves the page cache intact, so what is
    # tested (the order of writes, renames and the switch) is the same, and fsync costs nothing.
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path
    try:
        first_two = POINTS_FIRST_SAVE + POINTS_LATER_SAVE
        points = [*range(1, first_two + 1), first_two + 6, first_two + 12, first_two + 2 * POINTS_LATER_SAVE]
        jobs = [{"args": ["train", str(VERDICT), *SWEEP_ARGS, "--out", "ref"]}]
        for k in points:
            jobs.append({"args": ["train", str(VERDICT), *SWEEP_ARGS, "--out", f"k{k}"], "kill_at": k})
            jobs.append({"args": ["train", "--resume", f"k{k}", "--quiet"]})
        results = fork_jobs(jobs, base)
        assert results[0]["code"] == 0, results[0]["stderr"]
        reference = weights_and_metadata(base / "ref" / MODEL)
        ref_metrics = (base / "ref" / "metrics.jsonl").read_text()
        for k, killed, resumed in zip(points, results[1::2], results[2::2], strict=True):
            run = base / f"k{k}"
            assert killed["signal"] == signal.SIGKILL, (k, killed)
            assert resumed["code"] == 0, (k, resumed["stderr"])
            assert "Traceback" not in resumed["stderr"]
            assert_same_weights(weights_and_metadata(run / MODEL), reference, k)
            assert (run / "metrics.jsonl").read_text() == ref_metrics, k
            assert no_leftovers(run), (k, sorted(p.name for p in (run / "checkpoints").iterdir()))
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)


MODEL = "model.safetensors"


def start_training(out: Path, *extra: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptcli", "train", str(VERDICT), *TINY, "--epochs", "500", "--eval-freq", "2",
           "--json", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            **kwargs)


def wait_for_evaluations(proc: subprocess.Popen, count: int) -> None:
    for _ in range(count):  # each --json line is an evaluation: the run is well under way
        assert proc.stdout.readline(), proc.stderr.read()


def committed_step(run: Path) -> int:
    return json.loads((run / LATEST / "trainer.json").read_text())["steps_done"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_or_sighup_finishes_the_step_saves_and_exits(tmp_path, signum, code):
    """SIGHUP (the terminal closed) is one more stop request, like SIGTERM: 128 + the signal."""
    out = tmp_path / "run"
    proc = start_training(out)
    wait_for_evaluations(proc, 1)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "gptcli train --resume" in stderr and "Traceback" not in stderr
    step = committed_step(out)
    assert step >= 1
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", str(step + 1), "--quiet"])
    assert result.exit_code == 0, result.output
    assert committed_step(out) == step + 1


@pytest.mark.slow
def test_second_sigterm_aborts_and_the_run_still_resumes(tmp_path):
    out = tmp_path / "run"
    proc = start_training(out, "--save-every", "1")
    wait_for_evaluations(proc, 1)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    step = committed_step(out)
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", str(step + 1), "--quiet"])
    assert result.exit_code == 0, result.output
    assert no_leftovers(out)


@pytest.mark.slow
def test_a_second_train_into_a_running_run_is_refused_and_a_dead_holder_never_blocks(tmp_path):
    out = tmp_path / "run"
    holder = start_training(out)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").exists() and (out / ".lock").read_text()):  # the holder wrote its pid
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.1)
        for args in ([str(VERDICT), *TINY, "--out", str(out)], ["--resume", str(out)]):
            second = subprocess.run([sys.executable, "-m", "gptcli", "train", *args], capture_output=True, text=True,
                                    env=subprocess_env(), timeout=120)
            assert second.returncode == 1
            assert second.stderr == f"error: {out} is in use by another gptcli train (pid {holder.pid})\n"
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
        holder.communicate(timeout=60)
    assert (out / ".lock").exists()
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output


def poisoned_weights(tmp_path: Path) -> Path:
    """A model file whose weights are NaN: training from it diverges at step 0."""
    assert cli(*TINY, "--max-steps", "1", "--out", str(tmp_path / "good")).exit_code == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "good" / MODEL), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: torch.full_like(handle.get_tensor(k), math.nan) for k in handle.keys()}  # noqa: SIM118
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_divergence_at_step_0_saves_nothing_and_leaves_runs_latest(tmp_path):
    nan = poisoned_weights(tmp_path)
    latest_before = os.readlink("runs/latest")
    result = cli("--init", str(nan), "--batch-size", "4", "--eval-iter", "1", "--out", str(tmp_path / "bad"), "-q")
    assert result.exit_code == 3
    assert "training loss became nan at step 0" in result.output and "no checkpoint was saved" in result.output
    assert "is kept" not in result.output
    assert not (tmp_path / "bad").exists()  # the new run directory is removed again
    assert os.readlink("runs/latest") == latest_before


def test_divergence_names_the_checkpoint_that_is_kept(tmp_path):
    out = tmp_path / "run"
    result = cli(*TINY, "--lr", "1e20", "--save-every", "1", "--out", str(out))
    assert result.exit_code == 3
    step = committed_step(out)
    assert f"stopped without saving (the last checkpoint (step {step}) is kept)" in result.output
    assert all(torch.isfinite(t).all() for t in load_file(out / MODEL).values())


def test_gradient_norm_is_checked_without_grad_clip(monkeypatch, tmp_path):
    import gptcli.train

    monkeypatch.setattr(gptcli.train, "gradient_norm", lambda model, clip: math.inf)
    result = cli(*TINY, "--max-steps", "3", "--out", str(tmp_path / "run"))
    assert result.exit_code == 3 and "gradient norm became inf at step 0" in result.output


@pytest.mark.parametrize("option,value,says", [
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--lr", "0", "--lr must be a finite number above 0"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number, got inf"),
    ("--min-lr", "inf", "--min-lr must be a finite number, got inf"),
    ("--min-lr", "nan", "--min-lr must be a finite number, got nan"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number, got nan"),
    ("--grad-clip", "inf", "--grad-clip must be a finite number, got inf"),
    ("--grad-clip", "0", "--grad-clip must be a finite number above 0"),
    ("--grad-clip", "-1", "--grad-clip must be a finite number above 0"),
    ("--train-ratio", "1.5", "--train-ratio must be a finite number above 0 and below 1"),
    ("--seed", "-1", "--seed must be between 0 and 2**63-1"),
    ("--seed", str(2**63), "--seed must fit in 64 bits"),
    ("--keep-checkpoints", "0", "--keep-checkpoints must be at least 1"),
    ("--sample-prompt", "", "--sample-prompt must not be empty"),
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, option, value, says):
    out = tmp_path / "run"
    result = cli(*TINY, "--max-steps", "1", "--sample-tokens", "5", "--out", str(out), option, value)
    assert result.exit_code == 2
    assert result.output == f"error: {result.output[7:]}" and result.output.count("\n") == 1
    assert says in result.output, result.output
    assert not out.exists() and not Path("runs").exists()


def test_out_that_is_a_file_or_inside_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, says in ((afile, "is a file"), (afile / "run", f"is inside {afile}, which is a file")):
        result = cli(*TINY, "--out", str(out))
        assert result.exit_code == 2 and says in result.output and result.output.count("\n") == 1


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--max-steps", "1", "--out", str(out)).exit_code == 0

    def small_files() -> None:  # writes beyond 1 MB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    full = subprocess.run([sys.executable, "-m", "gptcli", "train", "--resume", str(out), "--max-steps", "3", "-q"],
                          capture_output=True, text=True, env=subprocess_env(), preexec_fn=small_files, timeout=120)
    assert full.returncode == 1
    assert full.stderr == "error: the disk is full; the last complete checkpoint (step 1) is kept\n"
    assert committed_step(out) == 1
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert committed_step(out) == 2 and no_leftovers(out)


def test_resume_without_the_init_file_and_init_from_a_run_directory(tmp_path):
    assert cli(*TINY, "--max-steps", "1", "--out", str(tmp_path / "source")).exit_code == 0
    init = tmp_path / "init.safetensors"
    shutil.copy(tmp_path / "source" / MODEL, init)
    out = tmp_path / "run"
    assert cli("--init", str(init), "--batch-size", "4", "--max-steps", "1", "--eval-iter", "1", "--sample-tokens",
               "0", "--out", str(out), "-q").exit_code == 0
    init.unlink()
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    result = cli("--init", str(tmp_path / "source"), "--batch-size", "4", "--max-steps", "1", "--eval-iter", "1",
                 "--sample-tokens", "0", "--out", str(tmp_path / "from-dir"), "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage,says", [
    (lambda ck: (ck / "trainer.json").write_text('{"steps_do'), "trainer.json is not valid JSON"),
    (lambda ck: (ck / "trainer.json").write_text("[1, 2]"), "trainer.json is not a trainer state"),
    (lambda ck: (ck / "trainer.json").write_text('{"steps_done": 1}'), "trainer.json is not a trainer state"),
    (lambda ck: (ck / "trainer.safetensors").write_bytes((ck / "trainer.safetensors").read_bytes()[:5000]),
     "trainer.safetensors is damaged or truncated"),
    (lambda ck: (ck / MODEL).unlink(), "model.safetensors is missing"),
    (lambda ck: (ck / "trainer.json").write_text((ck / "trainer.json").read_text().replace(
        '"steps_done": 1', '"steps_done": 7')), "holds files of different steps"),
])
def test_damaged_checkpoints_give_one_line_naming_the_file(tmp_path, damage, says):
    out = tmp_path / "run"
    assert cli(*TINY, "--max-steps", "1", "--out", str(out)).exit_code == 0
    damage(out / "checkpoints" / "step-000001")
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert says in result.output and "--init" in result.output and "Traceback" not in result.output


def test_leftovers_are_removed_and_an_old_layout_run_resumes(tmp_path):
    out = tmp_path / "run"
    assert cli(*TINY, "--max-steps", "1", "--out", str(out)).exit_code == 0
    # The layout before checkpoints/: the three files at the top level.
    step_dir = out / "checkpoints" / "step-000001"
    (out / MODEL).unlink()
    for name in (MODEL, "trainer.safetensors", "trainer.json"):
        shutil.move(step_dir / name, out / name)
    shutil.rmtree(out / "checkpoints")
    # What interrupted writes leave: a temporary checkpoint, an uncommitted one, temporary files.
    (out / "checkpoints" / ".tmp-abc").mkdir(parents=True)
    (out / "checkpoints" / "step-000009").mkdir()
    (out / ".metrics.jsonl.x1.tmp").write_text("half")
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert committed_step(out) == 2 and no_leftovers(out)
    assert not (out / "trainer.json").exists() and os.readlink(out / MODEL) == "checkpoints/latest/model.safetensors"


def test_keep_checkpoints_and_file_modes_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        result = cli(*TINY, "--max-steps", "4", "--save-every", "1", "--keep-checkpoints", "2", "--out", str(out))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003", "step-000004"]
    step_dir = out / "checkpoints" / "step-000004"
    assert step_dir.stat().st_mode & 0o777 == 0o755
    for name in (MODEL, "trainer.safetensors", "trainer.json"):
        assert (step_dir / name).stat().st_mode & 0o777 == 0o644, name


def test_a_second_signal_aborts(monkeypatch):
    from gptcli.commands.train import _StopSignals

    with _StopSignals(announce=False) as stop:
        stop.started = True  # (before the first step, the first signal aborts: see test_stopping.py)
        os.kill(os.getpid(), signal.SIGTERM)  # the first: stop after this step
        assert stop.requested == signal.SIGTERM and stop.exit_code() == 143
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the second: abort now
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_metrics_and_json_lines_are_strict_json(monkeypatch, tmp_path):
    import gptcli.train

    monkeypatch.setattr(gptcli.train, "perplexity", lambda loss: math.inf)  # what an overflow gives
    out = tmp_path / "run"
    result = cli(*TINY, "--max-steps", "2", "--eval-freq", "1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    for text in (result.stdout, (out / "metrics.jsonl").read_text()):
        lines = [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
        assert lines and all(line["val_ppl"] is None for line in lines)
    assert jsonio.dumps({"a": [math.nan, -math.inf, 1.5]}) == '{"a": [null, null, 1.5]}'


def test_misleading_messages_are_fixed(tmp_path):
    result = runner.invoke(app, ["train", "-"])
    assert result.exit_code == 2 and "does not read stdin" in result.output and "gptcli prepare -" in result.output
    result = cli(*TINY, "--stride", "2000", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "--stride (2000)" in result.output
    prepared = tmp_path / "data"
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you. " * 30)
    assert runner.invoke(app, ["prepare", str(short), "--out", str(prepared), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["train", str(prepared), *TINY, "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "not enough tokens" in result.output
    assert "--train-ratio" not in result.output and "prepare" in result.output
