"""Resource limits: memory estimates from a command's options, refused before any allocation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptcli import limits
from gptcli.config import PRESETS, GPTConfig
from gptcli.errors import GptcliError, UsageError

CHAPTER = PRESETS["124M"].replace(context_length=256)


def test_the_chapters_run_is_estimated_near_its_measured_peak() -> None:
    # Measured: 4.0 GB peak RSS for the chapter's run (124M, context 256, batch 2) with fp32 AdamW.
    assert 3.0e9 < limits.training_bytes(CHAPTER, 2) < 6.0e9


def test_absurd_shapes_are_estimated_without_building_anything() -> None:
    huge = CHAPTER.replace(n_layers=2**62)
    assert limits.training_bytes(huge, 2) > 1e26  # closed form: no per-layer list is made
    assert limits.decoding_bytes(CHAPTER, rows=2**40, length=256) > 1e18


def test_what_cannot_fit_is_refused_with_the_override_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "available_memory", lambda: 8 * 10**9)
    limits.check_memory(7 * 10**9, "training")
    with pytest.raises(UsageError, match=r"training needs about 9\.0 GB .* \(8\.0 GB\).*--ignore-memory-check"):
        limits.check_memory(9 * 10**9, "training")
    limits.check_memory(9 * 10**9, "training", ignore=True)


def test_available_memory_is_read() -> None:
    assert 10**8 < limits.available_memory() < 10**14


@pytest.mark.parametrize("threads", [0, limits.MAX_THREADS + 1, 2**63 - 1])
def test_threads_out_of_range(threads: int) -> None:
    with pytest.raises(UsageError, match="--threads must be between 1 and 4096"):
        limits.check_threads(threads)


def test_a_model_file_claiming_huge_depth_is_refused_at_once(tmp_path: Path) -> None:
    from gptcli.modelfile import load_model

    config = GPTConfig(vocab_size=16, context_length=8, emb_dim=8, n_heads=2, n_layers=2**40)
    path = tmp_path / "m.safetensors"
    save_file({"tok_emb.weight": torch.zeros(16, 8)}, str(path),
              metadata={"format": "gptcli", "config": json.dumps(config.to_dict())})
    with pytest.raises(GptcliError, match="holds 1 tensors in all"):
        load_model(path)
