"""Damaged run files are read through one checked reader each: a torn last line of metrics.jsonl
is dropped (as append-only logs do), anything else damaged is one line naming the file, never a
traceback, and never read as "no checkpoint yet" (which would start the run again)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.train import train

from .test_train import tiny_settings

runner = CliRunner()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    list(train(tiny_settings(out, max_steps=4, eval_freq=1)))  # 4 evaluations in metrics.jsonl
    return out


def test_a_torn_last_metrics_line_is_dropped_by_resume_and_info(run):
    metrics = run / "metrics.jsonl"
    complete = metrics.read_text()
    with open(metrics, "a") as handle:
        handle.write('{"epoch": 1, "step": 4, "tokens_se')  # a process killed while appending
    result = runner.invoke(app, ["info", str(run), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", str(run), "--max-steps", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert metrics.read_text().startswith(complete) and metrics.read_text().endswith("}\n")


def test_a_damaged_metrics_line_elsewhere_is_one_line_naming_it(run):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], '{"step": 1, "tra\n', *lines[2:]]))
    for args in (["info", str(run)], ["train", "--resume", str(run), "--max-steps", "5", "-q"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert result.output.startswith(f"error: {metrics} is damaged: line 2 is not a JSON evaluation (")
        assert result.output.count("\n") == 1
    assert metrics.read_text().count("\n") == len(lines)  # nothing rewritten


def test_a_truncated_model_file_is_one_line_in_info(run):
    model = (run / "model.safetensors").resolve()
    os.truncate(model, model.stat().st_size // 2)
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {run / 'model.safetensors'} is not a readable safetensors file")
    assert result.output.count("\n") == 1


def test_checkpoints_replaced_by_a_file_is_refused_not_restarted(run):
    import shutil

    metrics = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")
    result = runner.invoke(app, ["train", "--resume", str(run), "--max-steps", "5", "-q"])
    assert result.exit_code == 1
    assert result.output == (f"error: {run / 'checkpoints'} is a file, not the run's checkpoint directory; "
                             "move it away (or restore the directory) and try again\n")
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_dangling_runs_latest_says_its_run_is_gone():
    Path("runs").mkdir()  # in the test's own working directory
    Path("runs/latest").symlink_to("20250101-000000-the-verdict")
    says = "runs/latest points at 20250101-000000-the-verdict, which does not exist (the run"
    result = runner.invoke(app, ["train", "--resume", "runs/latest", "-q"])
    assert result.exit_code == 2 and result.output.startswith(f"error: --resume {says} it named is gone)")
    result = runner.invoke(app, ["info", "runs/latest"])
    assert result.exit_code == 2 and says in result.output


def test_the_init_suggestion_names_only_a_model_file_that_exists(run):
    checkpoint = run / "checkpoints" / "latest"
    (checkpoint / "model.safetensors").unlink()
    result = runner.invoke(app, ["train", "--resume", str(run), "--max-steps", "5", "-q"])
    assert result.exit_code == 1 and "model.safetensors is missing" in result.output
    assert "e.g. --init" not in result.output  # the file it would suggest is the one that is gone


def test_damaged_prepared_data_suggests_a_prepare_that_works(tmp_path):
    from .conftest import VERDICT

    data = tmp_path / "data"
    assert runner.invoke(app, ["prepare", str(VERDICT), "--out", str(data), "--quiet"]).exit_code == 0
    (data / "train.bin").write_bytes(b"")
    result = runner.invoke(app, ["train", str(data), "--preset", "tiny", "-q"])
    assert result.exit_code == 1 and f"`gptcli prepare TEXT --out {data} --force`" in result.output
    result = runner.invoke(app, ["prepare", str(VERDICT), "--out", str(data), "--force", "--quiet"])
    assert result.exit_code == 0, result.output


def test_an_edited_run_json_is_named_not_the_checkpoint(tmp_path: Path) -> None:
    args = ["train", "--preset", "tiny", "--max-steps", "1", "--eval-iter", "1", "--sample-tokens", "0",
            "--batch-size", "2", "--quiet", "--no-plots", "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(app, args).exit_code == 0
    run_json = tmp_path / "run" / "run.json"
    settings = json.loads(run_json.read_text())
    settings["config"]["emb_dim"] = 64  # a hand edit: another model than the checkpoint holds
    run_json.write_text(json.dumps(settings))
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--max-steps", "2", "-q"])
    assert result.exit_code == 1, result.output
    assert f"{run_json} describes another model" in result.stderr
    assert "emb_dim 32 in the checkpoint, 64 in run.json" in result.stderr and "--init" not in result.stderr
