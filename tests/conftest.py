"""Shared test setup: the real data files (the package's bundled corpus and BPE files, and the tiny
checkpoint real TensorFlow wrote, in tests/data), an isolated gptcli cache and working directory
per test, and the tokenizer pointed at the bundled BPE files. Nothing outside the repository."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from gptcli.assets import BPE_DIR as BPE_DIR  # re-exported for the tests
from gptcli.assets import VERDICT as VERDICT

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "tests" / "data"
# OpenAI's release layout written by real TensorFlow (n_vocab 50257, n_ctx 128, n_embd 24, 2 heads,
# 2 layers), with expected.json (logits, greedy tokens, loss from HF transformers on its arrays) and
# weights.sha256.json (each saved array's sha256); encoder.json and vocab.bpe link to the package's.
OPENAI_TINY = DATA_DIR / "openai-tiny"

# Benchmarks' chapter reference code is importable from tests.
sys.path.insert(0, str(REPO_ROOT))


def openai_tiny_arrays() -> dict:
    """The fixture's arrays as gptcli's TensorFlow bundle reader reads them, each checked bit for bit
    against the sha256 of the array TensorFlow saved."""
    import numpy as np

    from gptcli.formats.tfbundle import TensorBundle

    manifest = json.loads((OPENAI_TINY / "weights.sha256.json").read_text())["arrays"]
    bundle = TensorBundle(OPENAI_TINY / "model.ckpt")
    arrays = {name: bundle.read(name) for name in manifest}
    for name, want in manifest.items():
        array = np.ascontiguousarray(arrays[name])
        got = {"dtype": str(array.dtype), "shape": list(array.shape),
               "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
        assert got == want, name
    return arrays


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: threads gain nothing there, and on a busy machine their hand-offs
    dominate. (Subprocesses, e.g. the torchrun tests, keep their own settings.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in its own directory with its own (empty) gptcli cache, so the tokenizer and
    the default corpus come from the package, as on a fresh install."""
    home = tmp_path / "gptcli-home"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    monkeypatch.delenv("GPTCLI_BPE_DIR", raising=False)  # the bundled BPE files, as a fresh install
    monkeypatch.delenv("GPTCLI_MIRROR", raising=False)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def tokenizer():
    from gptcli.tokenizer import get_tokenizer

    return get_tokenizer(BPE_DIR)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A tiny gptcli model file (seeded, untrained) for the commands' tests."""
    import torch

    from gptcli.config import get_preset
    from gptcli.model import GPT
    from gptcli.modelfile import save_model

    torch.manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_model(path, GPT(get_preset("tiny")))
    return path
