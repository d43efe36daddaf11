"""`gptcli eval` and gptcli.evaluate: sliding-window loss, perplexity, and a run's own split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.data import BatchLoader, WindowDataset, load_splits
from gptcli.errors import UsageError
from gptcli.evaluate import (
    EvalResult,
    evaluate_run_splits,
    mean_batch_loss,
    perplexity,
    sliding_window_loss,
    token_windows,
)
from gptcli.model import GPT
from gptcli.modelfile import save_model
from gptcli.settings import TrainSettings
from tests.conftest import VERDICT

runner = CliRunner()


@pytest.fixture(scope="module")
def small() -> GPT:
    torch.manual_seed(4)
    return GPT(get_preset("tiny").replace(context_length=8)).eval()


def invoke(*args: str, input: str | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(app, ["eval", *args], input=input)


def naive_loss(model: GPT, tokens: list[int], context_of) -> float:
    """Mean cross-entropy, one forward pass per predicted token, with context_of(j) as its context."""
    losses = []
    with torch.no_grad():
        for j in range(1, len(tokens)):
            begin = context_of(j)
            logits = model(torch.tensor([tokens[begin:j]]))[0, -1]
            losses.append(F.cross_entropy(logits[None], torch.tensor([tokens[j]])).item())
    return sum(losses) / len(losses)


# --- windows and losses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "context", "stride"), [(10, 4, 4), (10, 4, 2), (10, 4, 1), (37, 8, 3), (5, 8, 8)]
)
def test_windows_score_every_token_once(num_tokens: int, context: int, stride: int) -> None:
    scored = []
    for begin, end, first in token_windows(num_tokens, context, stride):
        assert 0 < end - begin <= context
        scored += range(begin + 1 + first, end + 1)  # target indices
    assert scored == list(range(1, num_tokens))


def test_stride_outside_context_is_rejected() -> None:
    for stride in (0, 9):
        with pytest.raises(UsageError):
            token_windows(100, 8, stride)


def test_sliding_window_equals_token_by_token(small: GPT) -> None:
    tokens = [(i * 7919) % 50000 for i in range(30)]
    context = small.config.context_length
    # Stride 1: every token sees up to a full context of earlier tokens.
    full = naive_loss(small, tokens, lambda j: max(0, j - context))
    assert sliding_window_loss(small, tokens, stride=1, batch_size=5)[0] == pytest.approx(full, rel=1e-5)
    # Stride = context: non-overlapping windows, the context restarts at each window.
    chunked = naive_loss(small, tokens, lambda j: (j - 1) // context * context)
    loss, count = sliding_window_loss(small, tokens, batch_size=2)
    assert loss == pytest.approx(chunked, rel=1e-5) and count == len(tokens) - 1
    # Batching (and the padded last window) does not change the result.
    assert sliding_window_loss(small, tokens, stride=3, batch_size=1)[0] == pytest.approx(
        sliding_window_loss(small, tokens, stride=3, batch_size=64)[0], rel=1e-5
    )


def test_perplexity_is_exp_loss() -> None:
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6) == float("inf")
    result = EvalResult("x", 10, 3.5)
    assert result.to_dict()["perplexity"] == pytest.approx(math.exp(3.5))


# --- the command ------------------------------------------------------------------------------------


def test_untrained_perplexity_is_near_vocab_size(model_file: Path) -> None:
    # The chapter's point: an untrained model hesitates between ~50k tokens.
    result = invoke(str(VERDICT), "-m", str(model_file), "--max-tokens", "400", "--json")
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["source"] == str(VERDICT) and record["tokens"] == 400
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert 20_000 < record["perplexity"] < 150_000


def test_files_stdin_and_table(model_file: Path, tmp_path: Path) -> None:
    text = VERDICT.read_text(encoding="utf-8")[:1500]
    sample_file = tmp_path / "sample.txt"
    sample_file.write_text(text, encoding="utf-8")
    piped = invoke("-m", str(model_file), "--json", input=text)
    both = invoke(str(sample_file), "-", "-m", str(model_file), "--json", "--stride", "32", input=text)
    assert piped.exit_code == 0 and both.exit_code == 0, both.output
    [from_stdin] = [json.loads(line) for line in piped.stdout.splitlines()]
    records = [json.loads(line) for line in both.stdout.splitlines()]
    assert from_stdin["source"] == "<stdin>" and [r["source"] for r in records] == [str(sample_file), "<stdin>"]
    assert records[0]["loss"] == pytest.approx(records[1]["loss"])
    assert records[0]["loss"] < from_stdin["loss"] + 0.5  # more context, sane range
    table = invoke(str(sample_file), "-m", str(model_file))
    assert table.exit_code == 0
    assert "perplexity" in table.stdout and "sample.txt" in table.stdout and "scored" in table.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--stride", "0"], ["--stride", "65"], ["--batch-size", "0"], ["--max-tokens", "1"],
        ["--device", "tpu"], ["--dtype", "fp16"], ["-", "-"], ["--threads", "0"],
    ],
)
def test_invalid_values_exit_2(model_file: Path, args: list[str]) -> None:
    result = invoke(str(VERDICT), "-m", str(model_file), *args, input="some text")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in result.output


def test_bad_sources(model_file: Path, tmp_path: Path) -> None:
    assert invoke("-m", str(model_file)).exit_code == 2  # nothing given, empty stdin
    assert invoke("--run", str(tmp_path), "-m", str(model_file)).exit_code == 2
    missing = invoke(str(tmp_path / "nope.txt"), "-m", str(model_file))
    assert missing.exit_code == 1 and "not found" in missing.stderr
    no_run = invoke("--run", str(tmp_path))
    assert no_run.exit_code == 2 and "no run.json there" in no_run.stderr


@pytest.mark.slow
def test_run_split_loss_equals_training_loss(tmp_path: Path, tokenizer) -> None:
    """Train a tiny model a few steps, record val loss the way training does, and check `eval --run`."""
    config = get_preset("tiny").replace(context_length=32)
    settings = TrainSettings(corpus=str(VERDICT), config=config, eval_iter=20).to_dict()
    splits = load_splits(VERDICT, tokenizer, settings["train_ratio"])
    train = BatchLoader(WindowDataset(splits.train, 32, 32), 2, shuffle=True, drop_last=True)
    val = BatchLoader(WindowDataset(splits.val, 32, 32), 2, shuffle=False, drop_last=False)
    assert len(val) <= settings["eval_iter"]  # training's evaluation then covers the whole val split

    torch.manual_seed(123)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, (inputs, targets) in enumerate(train):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 4:
            break
    model.eval()
    val_loss = mean_batch_loss(model, val.batches(None), settings["eval_iter"])
    run = tmp_path / "run"
    save_model(run / "model.safetensors", model)
    (run / "run.json").write_text(json.dumps(settings), encoding="utf-8")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "val_loss": val_loss}) + "\n", encoding="utf-8")

    result = invoke("--run", str(run), "--json")
    assert result.exit_code == 0, result.output
    train_record, val_record = [json.loads(line) for line in result.stdout.splitlines()]
    reported = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert val_record["loss"] == pytest.approx(reported, abs=1e-5)
    assert val_record["tokens"] == len(splits.val) and val_record["source"].endswith("(val)")
    # The train split: every window, in order, mean of the batch losses.
    all_train = BatchLoader(train.dataset, 2, shuffle=False, drop_last=False)
    expected = mean_batch_loss(model, all_train.batches(None), len(all_train))
    assert train_record["loss"] == pytest.approx(expected, abs=1e-5)
    assert evaluate_run_splits(model, run, tokenizer)[1].loss == pytest.approx(val_loss, abs=1e-6)


def test_windows_of_several_files_batch_together_with_each_file_scored_alone(tokenizer) -> None:
    from gptcli.evaluate import evaluate_sources, evaluate_tokens
    from gptcli.tokenizer import encode

    torch.manual_seed(3)
    model = GPT(get_preset("tiny").replace(context_length=16)).eval()
    tokens = encode(tokenizer, VERDICT.read_text(encoding="utf-8"))
    sources = [("a", tokens[:50]), ("b", tokens[100:103]), ("c", tokens[200:297])]
    together = evaluate_sources(model, sources, stride=8, batch_size=5)
    for (name, part), result in zip(sources, together, strict=True):
        alone = evaluate_tokens(model, name, part, stride=8, batch_size=1)
        assert (result.source, result.tokens) == (name, len(part))
        assert result.loss == pytest.approx(alone.loss, rel=1e-5)
