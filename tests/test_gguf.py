"""`gptcli convert --to gguf`: the file parses back with the gguf package's reader to the model's
tensors (in llama.cpp's gpt2 names and layout) and metadata, GPT-2's tokenizer included; and, when
llama.cpp has been built (`make llama-cpp`), llama.cpp's greedy tokens equal `gptcli sample`'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import GPTConfig
from gptcli.formats.gguf import dequantized, gguf_names, read_gguf
from gptcli.model import GPT
from gptcli.modelfile import save_model
from tests.conftest import BPE_DIR, REPO_ROOT

gguf = pytest.importorskip("gguf")
runner = CliRunner()
TINY = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2)
LLAMA_COMPLETION_ENV = "GPTCLI_LLAMA_COMPLETION"
LLAMA_COMPLETION = REPO_ROOT / "build" / "llama.cpp" / "build" / "bin" / "llama-completion"


def make_model(path: Path, config: GPTConfig = TINY, seed: int = 0, head_scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))  # non-zero biases and norms: a misplaced one would show
        model.out_head.weight.mul_(head_scale)
    save_model(path, model)
    return model


def to_gguf(model_path: Path, out: Path, gguf_type: str = "f32") -> None:
    args = ["convert", str(model_path), "--to", "gguf", "--gguf-type", gguf_type, "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("gguf_type", "config"),
    [
        ("f32", TINY),
        ("f16", TINY.replace(qkv_bias=True, tie_weights=True)),
        ("q8_0", TINY.replace(vocab_size=50304)),
    ],
)
@pytest.mark.slow
def test_gguf_parses_back_to_the_same_tensors_and_metadata(tmp_path: Path, gguf_type: str, config) -> None:
    model = make_model(tmp_path / "m.safetensors", config)
    to_gguf(tmp_path / "m.safetensors", tmp_path / "m.gguf", gguf_type)
    metadata, tensors = read_gguf(tmp_path / "m.gguf", with_vocab=True)
    expected_meta = {
        "general.architecture": "gpt2",
        "gpt2.block_count": 2,
        "gpt2.context_length": 64,
        "gpt2.embedding_length": 32,
        "gpt2.feed_forward_length": 128,
        "gpt2.attention.head_count": 2,
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.add_bos_token": False,
        "gptcli.converted_from": "gptcli",
    }
    assert {k: metadata.get(k) for k in expected_meta} == expected_meta
    assert metadata["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert GPTConfig.from_json(metadata["gptcli.config"]) == config
    encoder = json.loads((BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    assert all(tokens[i] == t for t, i in encoder.items())
    assert types[50256] == 3 and types[0] == 1 and set(types[50257:]) <= {5}  # control, normal, unused
    merges = metadata["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "Ġ t"

    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = gguf_names(config)
    by_name = {t.name: t for t in tensors}
    assert set(by_name) == set(names.values())
    assert ("output.weight" in by_name) is (not config.tie_weights)
    for ours, theirs in names.items():
        tensor = by_name[theirs]
        want = state.get(ours, np.zeros(3 * config.emb_dim, dtype=np.float32))  # llama.cpp needs a qkv bias
        got = dequantized(tensor)
        assert got.shape == want.shape, theirs
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(got, want), theirs
        elif tensor.tensor_type == gguf.GGMLQuantizationType.F16:
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), theirs
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0 and gguf_type == "q8_0"
            blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(got - want).reshape(-1, 32)
            # Half a quantization step per block, plus the rounding of the block's float16 scale.
            assert (err <= blocks * (0.5 / 127 + 2**-10)).all(), theirs
        expected_type = "F32" if gguf_type == "f32" or want.ndim == 1 else gguf_type.upper()
        assert tensor.tensor_type.name == expected_type, theirs


def test_gguf_refuses_a_vocabulary_smaller_than_gpt2s(tmp_path: Path) -> None:
    make_model(tmp_path / "m.safetensors", TINY.replace(vocab_size=1000))
    result = runner.invoke(app, ["convert", str(tmp_path / "m.safetensors"), "--to", "gguf"])
    assert result.exit_code == 2 and "vocabulary has 1000" in result.stderr
    assert not list(Path.cwd().glob("*.gguf*"))


def llama_completion() -> Path | None:
    explicit = os.environ.get(LLAMA_COMPLETION_ENV)
    candidate = Path(explicit) if explicit else LLAMA_COMPLETION
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def greedy_gap(model: GPT, ids: list[int], steps: int) -> float:
    """The smallest top-1/top-2 logit gap along gptcli's greedy path (near-ties could flip)."""
    x, gap = torch.tensor([ids]), float("inf")
    with torch.no_grad():
        for _ in range(steps):
            top = model(x)[0, -1].topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            x = torch.cat([x, model(x)[0, -1].argmax().view(1, 1)], dim=1)
    return gap


def test_llama_cpp_greedy_tokens_equal_gptcli_sample(tmp_path: Path, tokenizer) -> None:
    binary = llama_completion()
    if binary is None:
        reason = f"llama.cpp not built: no {LLAMA_COMPLETION} (run `make llama-cpp`, or set {LLAMA_COMPLETION_ENV})"
        print(f"SKIPPED: {reason}", file=sys.stderr)
        pytest.skip(reason)
    prompt, steps = "Every effort moves you", 24
    model = make_model(tmp_path / "m.safetensors", seed=3, head_scale=40.0)
    ids = tokenizer.encode(prompt)
    assert greedy_gap(model, ids, steps) > 1e-2  # a clear argmax at every step: float rounding cannot flip it
    to_gguf(tmp_path / "m.safetensors", tmp_path / "m.gguf", "f32")
    result = runner.invoke(app, ["sample", prompt, "--model", str(tmp_path / "m.safetensors"), "--temperature", "0",
                                 "-n", str(steps), "--json"])
    assert result.exit_code == 0, result.output
    sample = json.loads(result.stdout.splitlines()[0])
    ours = sample["token_ids"]
    assert sample["finish_reason"] == "length" and len(ours) == steps  # no <|endoftext|>: both ran all steps
    command = [str(binary), "-m", str(tmp_path / "m.gguf"), "-p", prompt, "-n", str(steps), "--temp", "0",
               "-ctk", "f32", "-ctv", "f32", "-c", "64", "-t", "1", "-no-cnv", "--no-warmup", "--simple-io",
               "--no-display-prompt", "-s", "1"]
    run = subprocess.run(command, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    text = run.stdout.removesuffix(b"\n\n")  # llama-completion ends its output with two newlines
    assert text == tokenizer.decode_bytes(ours), (text, ours)
    print("llama.cpp:", " ".join(command[1:]), "->", text.decode("utf-8", "replace"))  # visible with -s
