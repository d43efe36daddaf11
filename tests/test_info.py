"""`gptcli info`: every format gptcli reads, strict JSON, run directories in both layouts (the model
and trainer.json at the top, or the model a link into checkpoints/step-NNNNNN/), and a real run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.chapter import GPTModel
from gptcli.cli import app
from gptcli.config import PRESETS, GPTConfig, parameter_counts
from gptcli.model import GPT
from gptcli.modelfile import save_model
from gptcli.settings import TrainSettings
from tests.conftest import OPENAI_TINY, VERDICT

runner = CliRunner()
SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


def info(*args: object) -> dict:
    result = runner.invoke(app, ["info", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


@pytest.mark.parametrize(
    "config", [SMALL, SMALL.replace(qkv_bias=True, tie_weights=True), SMALL.replace(vocab_size=300)]
)
def test_parameter_counts_match_the_model(config: GPTConfig) -> None:
    model = GPT(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    head = config.vocab_size * config.emb_dim
    assert counts["untied"] - counts["tied"] == head


def test_chapter_counts_for_124m() -> None:
    counts = parameter_counts(PRESETS["124M"])
    assert (counts["untied"], counts["tied"]) == (163_009_536, 124_412_160)  # the chapter's numbers


@pytest.mark.slow
def test_gptcli_file_book_and_gguf(tmp_path: Path) -> None:
    save_model(tmp_path / "m.safetensors", GPT(SMALL))
    report = info(tmp_path / "m.safetensors")
    assert report["format"] == "gptcli" and GPTConfig.from_dict(report["config"]) == SMALL
    assert report["dtype"] == ["F32"] and report["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size
    assert "saved" in report["origin"]

    chapter_cfg = {"vocab_size": 300, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                   "drop_rate": 0.1, "qkv_bias": True}
    torch.save(GPTModel(chapter_cfg).state_dict(), tmp_path / "model.pth")
    report = info(tmp_path / "model.pth", "--n-heads", 4)
    assert report["format"] == "book" and report["dtype"] == ["float32"]
    assert report["config"]["qkv_bias"] is True and report["config"]["vocab_size"] == 300
    assert report["parameters"]["total"] == sum(p.numel() for p in GPTModel(chapter_cfg).parameters())

    convert = ["convert", str(tmp_path / "m.safetensors"), "--to", "gguf", "--gguf-type", "f16"]
    assert runner.invoke(app, [*convert, "--out", str(tmp_path / "m.gguf")]).exit_code == 0
    report = info(tmp_path / "m.gguf")
    assert report["format"] == "gguf" and report["dtype"] == ["F16", "F32"]
    assert GPTConfig.from_dict(report["config"]) == SMALL
    assert report["origin"]["gguf_type"] == "f16" and report["origin"]["converted_from"] == "gptcli"


def test_openai_and_hf_directories(tmp_path: Path) -> None:
    report = info(OPENAI_TINY)
    hparams = json.loads((OPENAI_TINY / "hparams.json").read_text())
    assert report["format"] == "openai" and report["config"]["n_layers"] == hparams["n_layer"]
    assert report["config"]["tie_weights"] is True and report["dtype"] == ["float32"]
    assert any(f.endswith(".index") for f in report["files"])
    result = runner.invoke(app, ["convert", str(OPENAI_TINY), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    report = info(tmp_path / "hf")
    assert report["format"] == "hf" and report["origin"]["model_type"] == "gpt2"
    assert report["config"]["emb_dim"] == hparams["n_embd"]


def fake_run(run_dir: Path, checkpoint_dirs: bool) -> None:
    """A run directory as `train` writes it, in the flat or the checkpoint-directory layout."""
    run_dir.mkdir()
    settings = TrainSettings(corpus="corpus.txt", config=SMALL, epochs=3)
    (run_dir / "run.json").write_text(json.dumps(settings.to_dict()))
    where = run_dir / "checkpoints" / "step-000040" if checkpoint_dirs else run_dir
    where.mkdir(parents=True, exist_ok=True)
    save_model(where / "model.safetensors", GPT(SMALL), {"step": "40"})
    trainer = {"steps_done": 40, "epoch": 2, "tokens_seen": 5120, "best_val_loss": 6.25}
    (where / "trainer.json").write_text(json.dumps(trainer))
    if checkpoint_dirs:
        os.symlink(Path("checkpoints/step-000040/model.safetensors"), run_dir / "model.safetensors")
    rows = [{"epoch": 1 + s // 20, "step": s, "tokens_seen": 128 * s, "train_loss": 7.0, "val_loss": 7.5,
             "train_ppl": 1000.0, "val_ppl": 1800.0, "lr": 4e-4} for s in range(0, 40, 5)]
    rows[-1]["val_loss"] = float("nan")  # as json.dumps writes a diverged evaluation
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("checkpoint_dirs", [False, True])
def test_run_directory_in_both_layouts(tmp_path: Path, checkpoint_dirs: bool) -> None:
    fake_run(tmp_path / "run", checkpoint_dirs)
    report = info(tmp_path / "run")
    origin = report["origin"]
    assert report["format"] == "run" and origin["corpus"] == "corpus.txt"
    progress = (origin["steps"], origin["tokens_seen"], origin["best_val_loss"], origin["epochs_done"])
    assert progress == (40, 5120, 6.25, 2)
    assert [e["step"] for e in origin["last_evaluations"]] == [15, 20, 25, 30, 35]
    assert origin["last_evaluations"][-1]["val_loss"] is None  # NaN as null: strict JSON
    real_file = "step-000040/model.safetensors" if checkpoint_dirs else "run/model.safetensors"
    assert origin["checkpoint"].endswith(real_file)
    table = runner.invoke(app, ["info", str(tmp_path / "run")])
    assert table.exit_code == 0 and "last evaluations" in table.stdout and "5,120" in table.stdout


def test_real_training_run(tmp_path: Path) -> None:
    train = ["train", str(VERDICT), "--preset", "tiny", "--context-length", "16", "--max-steps", "3", "--eval-freq",
             "1", "--eval-iter", "1", "--sample-tokens", "0", "--no-plots", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    origin = info(tmp_path / "run")["origin"]
    assert origin["steps"] == 3 and origin["corpus"] == str(VERDICT)
    assert origin["tokens_seen"] == 3 * 2 * 16 and len(origin["last_evaluations"]) == 3
    assert origin["best_val_loss"] == min(e["val_loss"] for e in origin["last_evaluations"])


def test_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.stderr.startswith("error: not found")
    (tmp_path / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["info", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
