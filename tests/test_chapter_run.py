"""With dropout, `gptcli train` is the chapter's training run: the same masks, drawn in the same
order from the same generator (embedding dropout, then per block the attention weights', the
residual's after attention and after the feed-forward), so the same losses at every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.events import Evaluation
from gptcli.settings import TrainSettings
from gptcli.train import train

from .conftest import VERDICT

# The verdict's first 12,000 characters: 2,674 training tokens make 41 windows at context 64, so
# 10 steps per epoch at batch 4 (most of the time goes to the 50,257-wide output layer).
CHARS = 12_000
CONFIG = get_preset("tiny").replace(context_length=64, drop_rate=0.1)
EPOCHS, BATCH, LR, EVAL_FREQ = 2, 4, 2e-3, 2
STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "verdict-start.txt"
    path.write_text(VERDICT.read_text()[:CHARS])
    return path


@pytest.fixture(scope="module")
def chapter_history(tokenizer, corpus) -> list[tuple[int, float, float]]:
    """The chapter's code (benchmarks/chapter.py, nn.Dropout everywhere), evaluated every other step."""
    from benchmarks.chapter import config_dict, run_chapter_training

    history, _ = run_chapter_training(corpus.read_text(), tokenizer, config_dict(CONFIG), batch_size=BATCH,
                                      num_epochs=EPOCHS, eval_freq=EVAL_FREQ, eval_iter=1, lr=LR)
    return history


def gptcli_history(corpus: Path, out: Path, dropout_rng: str = "exact") -> list[tuple[int, float, float]]:
    settings = TrainSettings(corpus=str(corpus), config=CONFIG, out=str(out), epochs=EPOCHS, batch_size=BATCH,
                             lr=LR, eval_freq=EVAL_FREQ, eval_iter=1, sample_tokens=3, plots=False,
                             dropout_rng=dropout_rng)
    return [(e.step, e.train_loss, e.val_loss) for e in train(settings) if isinstance(e, Evaluation)]


def largest_difference(a: list[tuple[int, float, float]], b: list[tuple[int, float, float]]) -> float:
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(0, EPOCHS * STEPS, EVAL_FREQ))
    return max(max(abs(t1 - t2), abs(v1 - v2)) for (_, t1, v1), (_, t2, v2) in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["on", "off"])
def test_losses_with_dropout_equal_the_chapters(chapter_history, corpus, tmp_path, monkeypatch, kernels):
    """gptcli's kernels (1-byte masks, recomputed attention) and, with GPTCLI_KERNELS=0, torch's
    own modules (SDPA's dropout) both give the chapter's losses at every other step of two epochs."""
    if kernels == "off":
        monkeypatch.setenv("GPTCLI_KERNELS", "0")
    got = gptcli_history(corpus, tmp_path / "run")
    assert largest_difference(got, chapter_history) < 1e-5


@pytest.mark.slow
def test_the_fast_stream_is_another_run(chapter_history, corpus, tmp_path):
    """--dropout-rng fast trains as well but draws other masks: not the chapter's numbers."""
    got = gptcli_history(corpus, tmp_path / "run", "fast")
    assert largest_difference(got, chapter_history) > 1e-3
    assert got[-1][1] < got[0][1] - 0.2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dropout_rng"] == "fast"


def test_an_unknown_dropout_rng_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["train", str(VERDICT), "--preset", "tiny", "--dropout-rng", "slow",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "Invalid value for '--dropout-rng': 'slow' is not one of 'exact', 'fast'" in result.output
    assert not (tmp_path / "run").exists()


def test_masks_are_drawn_in_the_chapters_order():
    """One training forward pass of the chapter's model and of gptcli's, from the same weights and
    generator state, give the same output and leave the generator in the same state."""
    from benchmarks.chapter import GPTModel, config_dict, to_gptcli_state_dict
    from gptcli.model import GPT

    torch.manual_seed(1)
    chapter = GPTModel(config_dict(CONFIG)).train()
    model = GPT(CONFIG).train()
    model.load_state_dict(to_gptcli_state_dict(chapter.state_dict(), CONFIG.n_layers))
    x = torch.randint(0, CONFIG.vocab_size, (3, 40))
    torch.manual_seed(2)
    want = chapter(x)
    want_state = torch.get_rng_state()
    torch.manual_seed(2)
    got = model(x)
    assert torch.equal(torch.get_rng_state(), want_state)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
