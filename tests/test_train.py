"""The model core and `gptcli train`: shapes, data semantics, the chapter's loop, resume, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import GPTConfig, get_preset, parameter_counts
from gptcli.data import BatchLoader, WindowDataset, check_enough_tokens, text_splits
from gptcli.errors import GptcliError, UsageError
from gptcli.events import CheckpointSaved, Evaluation, RunFinished
from gptcli.model import GPT
from gptcli.settings import TrainSettings
from gptcli.train import learning_rate, train

from .conftest import VERDICT

runner = CliRunner()
LATEST = Path("checkpoints") / "latest"

TINY = get_preset("tiny").replace(context_length=64)
# 4,608 training tokens at context 64 make 72 windows: 9 steps per epoch at batch 8.
TINY_ARGS = ["--preset", "tiny", "--context-length", "64", "--batch-size", "8", "--eval-freq", "3",
             "--eval-iter", "2", "--sample-tokens", "5"]


def tiny_settings(out: Path, **changes) -> TrainSettings:
    values = dict(corpus=str(VERDICT), config=TINY, out=str(out), batch_size=8, eval_freq=3, eval_iter=2,
                  sample_tokens=5, epochs=2, lr=1e-3, plots=False)
    values.update(changes)
    return TrainSettings(**values)


def evaluations(events) -> list[Evaluation]:
    return [e for e in events if isinstance(e, Evaluation)]


def test_parameter_counts_match_gpt2_124m():
    config = get_preset("124M")
    assert config.context_length == 1024
    counts = parameter_counts(config)
    assert (counts["untied"], counts["tied"]) == (163_009_536, 124_412_160)
    tied = GPT(config.replace(tie_weights=True))
    assert sum(p.numel() for p in tied.parameters()) == 124_412_160
    assert tied.out_head.weight is tied.tok_emb.weight


@pytest.mark.parametrize("name,shape", [("355M", (1024, 24, 16)), ("gpt2-large", (1280, 36, 20)),
                                        ("1558M", (1600, 48, 25))])
def test_presets_have_gpt2_shapes(name, shape):
    config = get_preset(name)
    assert (config.emb_dim, config.n_layers, config.n_heads) == shape
    assert config.vocab_size == 50257


def test_invalid_config_is_a_usage_error():
    with pytest.raises(UsageError, match="divisible"):
        GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(UsageError, match="unknown preset"):
        get_preset("7B")


def test_model_matches_the_chapter_code():
    from benchmarks.chapter import GPTModel, config_dict, to_gptcli_state_dict

    config = TINY.replace(drop_rate=0.0)
    torch.manual_seed(123)
    reference = GPTModel(config_dict(config)).eval()
    torch.manual_seed(123)
    model = GPT(config).eval()
    # Seeded initialisation is the chapter's, tensor for tensor.
    expected = to_gptcli_state_dict(reference.state_dict(), config.n_layers)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    idx = torch.randint(0, config.vocab_size, (2, 40))
    torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    from gptcli.model import KVCache

    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache(TINY, batch_size=2)
    prefix = model(idx[:, :12], cache)
    chunk = model(idx[:, 12:17], cache)
    steps = [model(idx[:, i : i + 1], cache) for i in range(17, 20)]
    torch.testing.assert_close(torch.cat([prefix, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_verdict_windows_and_batches_match_the_chapter(tokenizer):
    splits = text_splits(VERDICT, tokenizer, 0.9)
    train = BatchLoader(WindowDataset(splits.train, 256, 256), 2, shuffle=True, drop_last=True)
    val = BatchLoader(WindowDataset(splits.val, 256, 256), 2, shuffle=False, drop_last=False)
    assert len(train) == 9
    assert sum(x.numel() for x, _ in train) == 4608
    assert sum(x.numel() for x, _ in val) == 512
    x, y = next(iter(val))
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_batch_loader_draws_rng_like_dataloader():
    tokens = torch.arange(3000).numpy()
    dataset = WindowDataset(tokens, 64, 64)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            w = torch.from_numpy(dataset.window(i))
            return w[:-1], w[1:]

    torch.manual_seed(7)
    expected = [x[:, 0].tolist() for _ in range(2)
                for x, _ in torch.utils.data.DataLoader(Windows(), batch_size=4, shuffle=True, drop_last=True)]
    after_expected = torch.rand(3)
    torch.manual_seed(7)
    loader = BatchLoader(dataset, 4, shuffle=True, drop_last=True)
    got = [x[:, 0].tolist() for _ in range(2) for x, _ in loader]
    assert got == expected
    assert torch.equal(torch.rand(3), after_expected)


def test_too_few_tokens_is_the_chapters_sanity_error(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Every effort moves you. " * 20)
    result = runner.invoke(app, ["train", str(corpus), "--quiet"])
    assert result.exit_code == 2
    assert "not enough tokens for the training loader" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content,message,code", [(b"", "is empty", 2), (b"\xff\xfe\x00bad", "not UTF-8", 1)])
def test_bad_corpus_files_give_one_line_errors(tmp_path, content, message, code):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    result = runner.invoke(app, ["train", str(corpus), "--quiet"])
    assert result.exit_code == code  # an empty file is bad input (2), like an empty stdin
    assert message in result.output
    assert result.output.count("\n") == 1


def test_missing_corpus_and_bad_options():
    result = runner.invoke(app, ["train", "no-such-file.txt"])
    assert result.exit_code == 1 and "corpus not found: no-such-file.txt" in result.output
    result = runner.invoke(app, ["train", str(VERDICT), "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size must be at least 1" in result.output
    result = runner.invoke(app, ["train", str(VERDICT), "--schedule", "linear"])
    assert result.exit_code == 2
    assert "Invalid value for '--schedule': 'linear' is not one of 'constant', 'cosine'" in result.output
    result = runner.invoke(app, ["train", str(VERDICT), "--threads", "0"])
    assert result.exit_code == 2 and "--threads must be between 1 and 4096, got 0" in result.output


def test_schedule_warmup_then_cosine():
    settings = tiny_settings(Path("x"), lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    lrs = [learning_rate(step, settings, total_steps=14) for step in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    # Cosine over the 10 steps after warmup: 0.1 + 0.45 * (1 + cos(pi * progress)), worked out by hand.
    assert lrs[6] == pytest.approx(0.9140576475)  # progress 0.2
    assert lrs[9] == pytest.approx(0.55)  # progress 0.5
    assert lrs[11] == pytest.approx(0.2854966365)  # progress 0.7
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert learning_rate(14, settings, 14) == pytest.approx(0.1)
    constant = tiny_settings(Path("x"), lr=0.5)
    assert {learning_rate(s, constant, 10) for s in range(10)} == {0.5}


@pytest.mark.slow
def test_training_reproduces_the_chapter_loop(tokenizer, tmp_path):
    """Same seed, same data order, same evaluation batches: the chapter's numbers (no dropout, whose
    random masks SDPA draws differently)."""
    from benchmarks.chapter import config_dict, run_chapter_training

    config = TINY.replace(drop_rate=0.0)
    history, _ = run_chapter_training(VERDICT.read_text(), tokenizer, config_dict(config), batch_size=8,
                                      num_epochs=2, eval_freq=3, eval_iter=2, lr=1e-3)
    events = list(train(tiny_settings(tmp_path / "run", config=config)))
    got = [(e.step, e.train_loss, e.val_loss) for e in evaluations(events)]
    assert [h[0] for h in history] == [g[0] for g in got]
    for (_, t1, v1), (_, t2, v2) in zip(history, got, strict=True):
        assert t2 == pytest.approx(t1, abs=1e-4) and v2 == pytest.approx(v1, abs=1e-4)


@pytest.mark.slow
def test_cli_run_writes_everything_and_json_parses(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(VERDICT), *TINY_ARGS, "--epochs", "3", "--lr", "2e-3",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["step"] for r in lines] == list(range(0, 27, 3))
    for key in ("epoch", "step", "tokens_seen", "train_loss", "val_loss", "train_ppl", "val_ppl", "lr"):
        assert key in lines[0]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] - 0.5
    assert lines[-1]["val_ppl"] == pytest.approx(math.exp(lines[-1]["val_loss"]))
    assert lines == [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("model.safetensors", "run.json", "loss.png", "perplexity.png", "checkpoints/latest/trainer.json",
                 "checkpoints/latest/trainer.safetensors", "checkpoints/latest/model.safetensors"):
        assert (out / name).is_file(), name
    assert os.readlink(out / "checkpoints" / "latest") == "step-000027"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000027"]  # keep 1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path("runs/latest").resolve() == out.resolve()
    # No pickle anywhere: weights and optimizer state load as plain safetensors.
    trainer = load_file(out / "checkpoints" / "latest" / "trainer.safetensors")
    assert "rng.cpu" in trainer and any(k.endswith("exp_avg") for k in trainer)
    assert json.loads((out / LATEST / "trainer.json").read_text())["steps_done"] == 27


def test_quiet_prints_nothing_and_existing_run_is_not_clobbered(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(VERDICT), *TINY_ARGS, "--max-steps", "2", "--out", str(out), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and result.output == ""
    before = (out / "model.safetensors").read_bytes()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already holds a run" in result.output
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path):
    full = list(train(tiny_settings(tmp_path / "full", epochs=3)))
    runner.invoke(app, ["train", str(VERDICT), *TINY_ARGS, "--lr", "1e-3", "--epochs", "1", "--no-plots",
                        "--out", str(tmp_path / "split"), "--quiet"])
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "split"), "--epochs", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    expected = [e.to_dict() for e in evaluations(full)]
    got = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert got == expected
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stop_mid_epoch_then_resume_is_exact(tmp_path):
    """A stop between steps (what Ctrl-C does) checkpoints mid-epoch; resuming replays nothing."""
    full = list(train(tiny_settings(tmp_path / "full")))
    steps = {"n": 0}

    def stop_after_13() -> bool:
        steps["n"] += 1
        return steps["n"] > 13

    first = list(train(tiny_settings(tmp_path / "split"), stop_requested=stop_after_13))
    assert first[-1].reason == "interrupted" and first[-1].steps == 13
    assert json.loads((tmp_path / "split" / LATEST / "trainer.json").read_text())["batch_in_epoch"] == 4
    resumed = list(train(tiny_settings(tmp_path / "split"), resume=True))
    assert [e.to_dict() for e in evaluations(first) + evaluations(resumed)] == \
        [e.to_dict() for e in evaluations(full)]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_features_beyond_the_chapter_train(tmp_path):
    """Warmup + cosine, clipping, accumulation and bf16 autocast run and learn."""
    events = list(train(tiny_settings(tmp_path / "run", epochs=1, micro_batch_size=2, grad_clip=1.0,
                                      schedule="cosine", warmup_steps=3, min_lr=1e-4, precision="bf16", lr=3e-3)))
    evals = evaluations(events)
    assert evals[-1].train_loss < evals[0].train_loss
    # Evaluations at steps 0, 3 and 6 of 9: warmup 3e-3 / 3, then the peak, then half way down the
    # cosine from 3e-3 to 1e-4 (1e-4 + 2.9e-3 / 2).
    assert [e.lr for e in evals] == pytest.approx([1e-3, 3e-3, 1.55e-3])


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    config = TINY.replace(drop_rate=0.0)
    whole = evaluations(train(tiny_settings(tmp_path / "a", config=config, epochs=1)))
    accumulated = evaluations(train(tiny_settings(tmp_path / "b", config=config, epochs=1, micro_batch_size=2)))
    for x, y in zip(whole, accumulated, strict=True):
        assert y.train_loss == pytest.approx(x.train_loss, abs=1e-4)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    list(train(tiny_settings(out, epochs=1)))
    good = (out / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "2", "--quiet"])
    assert result.exit_code == 0
    # A huge learning rate makes the weights overflow; training must stop, not save garbage.
    diverging = tmp_path / "nan"
    saved: list[tuple[int, bytes]] = []  # (step, model file) of each checkpoint, as it was committed
    with pytest.raises(GptcliError, match="training loss became") as info:
        for event in train(tiny_settings(diverging, epochs=1, lr=1e20, save_every=1)):
            if isinstance(event, CheckpointSaved):
                saved.append((event.step, (diverging / "model.safetensors").read_bytes()))
    assert info.value.exit_code == 3
    kept_step, kept_bytes = saved[-1]
    assert f"the last checkpoint (step {kept_step}) is kept" in info.value.message
    assert os.readlink(diverging / "checkpoints" / "latest") == f"step-{kept_step:06d}"
    assert (diverging / "model.safetensors").read_bytes() == kept_bytes  # not touched by the failure
    assert all(torch.isfinite(t).all() for t in load_file(diverging / "model.safetensors").values())
    assert (out / "model.safetensors").read_bytes() != good  # the resumed run did save


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptcli", "train", str(VERDICT), *TINY_ARGS, "--epochs", "200", "--out",
           str(out), "--quiet", "--no-plots", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "gptcli train --resume" in stderr and "Traceback" not in stderr
    state = json.loads((out / LATEST / "trainer.json").read_text())
    assert 0 < state["steps_done"] < 200 * 9
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", str(state["steps_done"] + 2),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / LATEST / "trainer.json").read_text())["steps_done"] == state["steps_done"] + 2


def test_resume_accepts_the_same_options_and_names_real_changes(tmp_path):
    out = tmp_path / "run"
    first = ["train", str(VERDICT), *TINY_ARGS, "--lr", "1e-3", "--max-steps", "1", "--out", str(out), "--quiet"]
    assert runner.invoke(app, first).exit_code == 0
    # The same command from shell history, with --resume added (and a longer run) is accepted.
    result = runner.invoke(app, [*first[:-5], "--max-steps", "2", "--out", str(out), "--resume", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / LATEST / "trainer.json").read_text())["steps_done"] == 2
    result = runner.invoke(app, ["train", "--resume", str(out), "--n-layers", "4", "--lr", "0.002"])
    assert result.exit_code == 2
    assert "--n-layers (the run's 2, given 4)" in result.output
    assert "--lr (the run's 0.001, given 0.002)" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_init_from_saved_weights(tmp_path):
    out = tmp_path / "run"
    source = evaluations(train(tiny_settings(out, epochs=2, lr=3e-3)))
    result = runner.invoke(app, ["train", str(VERDICT), "--init", str(out / "model.safetensors"),
                                 "--context-length", "64", "--batch-size", "8", "--max-steps", "1",
                                 "--eval-iter", "2", "--out", str(tmp_path / "ft"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    # Starts from the trained weights (one small step later), not from scratch.
    assert first["val_loss"] < source[-1].val_loss + 0.05
    assert first["val_loss"] < source[0].val_loss - 0.3
    result = runner.invoke(app, ["train", str(VERDICT), "--init", str(out / "model.safetensors"),
                                 "--emb-dim", "64"])
    assert result.exit_code == 2 and "conflict" in result.output


@pytest.mark.slow
def test_run_finished_reports_the_run(tmp_path):
    events = list(train(tiny_settings(tmp_path / "run", epochs=1)))
    done = events[-1]
    assert isinstance(done, RunFinished) and done.reason == "completed" and done.steps == 9
    assert done.tokens_seen == 9 * 8 * 64


def test_help_lists_the_chapter_options():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--eval-freq", "--eval-iter", "--seed",
                   "--out", "--resume", "--json", "--quiet", "--warmup-steps", "--grad-clip", "--precision",
                   "--compile", "--device", "--max-steps", "--init", "--qkv-bias", "--context-length"):
        assert option in result.output, option


def test_check_enough_tokens_for_validation(tokenizer):
    splits = text_splits(VERDICT, tokenizer, 0.99)
    with pytest.raises(UsageError, match="validation loader"):
        check_enough_tokens(splits, 256)


def test_no_corpus_trains_on_the_bundled_verdict_offline(monkeypatch):
    from gptcli.assets import VERDICT as BUNDLED
    from gptcli.paths import verdict_cache_path

    monkeypatch.setenv("GPTCLI_MIRROR", "/nonexistent-mirror")  # any download attempt would fail
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    args = ["train", "--preset", "tiny", "--context-length", "64", "--batch-size", "8", "--max-steps", "1",
            "--eval-iter", "1", "--sample-tokens", "0", "--quiet", "--no-plots", "--out", "run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(Path("run/run.json").read_text())["corpus"] == str(BUNDLED)
    assert not verdict_cache_path().exists()


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    from gptcli.events import Notice

    def broken_compile(module):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")  # what a machine without a toolchain raises, in short

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    events = list(train(tiny_settings(tmp_path / "c", epochs=1, compile=True)))
    assert any(isinstance(e, Notice) and "torch.compile failed" in e.text for e in events)
    eager = evaluations(train(tiny_settings(tmp_path / "e", epochs=1)))
    assert [e.to_dict() for e in evaluations(events)] == [e.to_dict() for e in eager]


@pytest.mark.parametrize("damage,says", [
    (lambda s: {**s, "colour": "blue"}, "unknown setting(s): colour"),
    (lambda s: {k: v for k, v in s.items() if k != "corpus"}, "missing setting(s): corpus"),
    (lambda s: [s], "the settings must be a JSON object, got list"),
    (lambda s: {**s, "lr": "x"}, "lr must be a number, got 'x'"),
    (lambda s: {**s, "epochs": 1.5}, "epochs must be an integer, got 1.5"),
    (lambda s: {**s, "plots": 1}, "plots must be true or false, got 1"),
    (lambda s: {**s, "lr": math.nan}, "lr must be a finite number above 0, got nan"),  # the key, not --lr
    (lambda s: {**s, "max_steps": 0}, "max_steps must be at least 1, got 0"),
])
def test_a_damaged_run_json_is_refused_on_resume(tmp_path, damage, says):
    out = tmp_path / "run"
    list(train(tiny_settings(out, max_steps=1)))
    run_json = out / "run.json"
    run_json.write_text(json.dumps(damage(json.loads(run_json.read_text()))))
    result = runner.invoke(app, ["train", "--resume", str(out), "-q"])
    assert result.exit_code == 2
    assert result.output == f"error: --resume {run_json} is damaged ({says}); it cannot be resumed\n"


def test_settings_check_their_declared_ranges_and_choices(tmp_path):
    """What the command line cannot catch (run.json, the API) is checked from the same declarations."""
    with pytest.raises(UsageError, match=r"^--schedule must be one of constant, cosine, got 'linear'$"):
        tiny_settings(tmp_path, schedule="linear").validate()
    with pytest.raises(UsageError, match=r"^--stride must be at least 1, got 0$"):
        tiny_settings(tmp_path, stride=0).validate()
    with pytest.raises(UsageError, match=r"^--seed must be between 0 and 2\*\*63-1, got -1$"):
        tiny_settings(tmp_path, seed=-1).validate()
    tiny_settings(tmp_path, stride=None, grad_clip=None, max_steps=None).validate()  # optional, left out
