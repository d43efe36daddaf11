"""Shared test setup: ../shared (or $GPTCLI_SHARED) for the real data files, an isolated gptcli
cache and working directory per test, and the tokenizer pointed at the local BPE files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GPTCLI_SHARED", REPO_ROOT.parent / "shared")).resolve()
VERDICT = SHARED / "data" / "the-verdict.txt"
BPE_DIR = SHARED / "data" / "gpt2"
OPENAI_TINY = SHARED / "fixtures" / "openai-tiny"

# Benchmarks' chapter reference code is importable from tests.
sys.path.insert(0, str(REPO_ROOT))


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
    """Each test runs in its own directory with its own gptcli cache and offline tokenizer."""
    home = tmp_path / "gptcli-home"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    monkeypatch.setenv("GPTCLI_BPE_DIR", str(BPE_DIR))
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

    from gptcli.checkpoint import save_model
    from gptcli.config import get_preset
    from gptcli.model import GPT

    torch.manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_model(path, GPT(get_preset("tiny")))
    return path
