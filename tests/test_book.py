"""The book's own model files, both ways: the chapter's GPTModel (benchmarks/chapter.py) saved with
torch.save -> gptcli (same logits), gptcli -> the chapter's keys (the chapter's class loads them
strictly, same logits), book -> gptcli -> book (identical state dict), and one-line refusals of
truncated, foreign or malicious .pth files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from benchmarks.chapter import GPTModel
from gptcli.cli import app
from gptcli.config import GPTConfig
from gptcli.model import GPT
from gptcli.modelfile import load_model, read_metadata, save_model

runner = CliRunner()
CFG = {"vocab_size": 128, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
       "qkv_bias": False}
IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 1, 64]])


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def chapter_model(seed: int = 0, tied: bool = False, **changes) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel({**CFG, **changes}).eval()
    with torch.no_grad():  # non-trivial norms so that a swapped scale/shift would show
        for name, p in model.named_parameters():
            if name.endswith((".scale", ".shift")):
                p.add_(0.1 * torch.randn_like(p))
    if tied:
        model.out_head.weight = model.tok_emb.weight
    return model


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("qkv_bias", "tied"), [(False, False), (True, False), (True, True)])
def test_chapter_pth_to_gptcli_same_logits(tmp_path: Path, qkv_bias: bool, tied: bool) -> None:
    chapter = chapter_model(qkv_bias=qkv_bias, tied=tied)
    torch.save(chapter.state_dict(), tmp_path / "model.pth")
    out = tmp_path / "model.safetensors"
    result = invoke("convert", tmp_path / "model.pth", "--n-heads", 4, "--out", out)
    assert result.exit_code == 0, result.output
    model, _ = load_model(out)
    assert model.config.qkv_bias is qkv_bias and model.config.tie_weights is tied
    assert (model.config.vocab_size, model.config.context_length, model.config.emb_dim, model.config.n_layers) == (
        128, 16, 32, 2)
    assert read_metadata(out)["converted_from"] == "book"
    with torch.no_grad():
        assert torch.allclose(model(IDS), chapter(IDS), atol=1e-5, rtol=0)


def test_gptcli_to_book_loads_strictly_in_the_chapter_class(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = GPTConfig(vocab_size=128, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True,
                       tie_weights=True)
    gpt = GPT(config).eval()
    save_model(tmp_path / "gpt.safetensors", gpt)
    out = tmp_path / "book.safetensors"
    result = invoke("convert", tmp_path / "gpt.safetensors", "--to", "book", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    gpt_config = json.loads(result.stdout)["GPT_CONFIG"]
    assert gpt_config == {"vocab_size": 128, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                          "drop_rate": 0.1, "qkv_bias": True}
    chapter = GPTModel(gpt_config).eval()
    state = load_file(str(out))
    assert list(state) == list(chapter.state_dict())  # exactly the chapter's keys, in its order
    chapter.load_state_dict(state)  # strict: att.mask buffers included
    with torch.no_grad():
        assert torch.allclose(chapter(IDS), gpt(IDS), atol=1e-5, rtol=0)
    plain = invoke("convert", tmp_path / "gpt.safetensors", "--to", "book", "--out", tmp_path / "b2.safetensors")
    assert plain.exit_code == 0 and plain.stdout.startswith("GPT_CONFIG = {'vocab_size': 128")


def test_book_to_gptcli_to_book_is_identical(tmp_path: Path) -> None:
    original = chapter_model(seed=2, qkv_bias=True).state_dict()
    torch.save(original, tmp_path / "model.pth")
    assert invoke("convert", tmp_path / "model.pth", "--n-heads", 4, "--out", tmp_path / "g.safetensors").exit_code == 0
    result = invoke("convert", tmp_path / "g.safetensors", "--to", "book", "--out", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.output
    back = load_file(str(tmp_path / "b.safetensors"))
    assert list(back) == list(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    # ...and the book safetensors converts back without --n-heads (its GPT_CONFIG metadata says).
    result = invoke("convert", tmp_path / "b.safetensors", "--out", tmp_path / "g2.safetensors")
    assert result.exit_code == 0, result.output
    assert load_file(str(tmp_path / "g2.safetensors")).keys() == load_file(str(tmp_path / "g.safetensors")).keys()


def test_model_and_optimizer_pth_keeps_the_step_count(tmp_path: Path) -> None:
    model = chapter_model(seed=3, emb_dim=768, n_heads=12, n_layers=1, vocab_size=64).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(IDS % 64).logsumexp(-1).mean().backward()
        optimizer.step()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    out = tmp_path / "m.safetensors"
    result = invoke("convert", tmp_path / "model_and_optimizer.pth", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["n_heads"] == 12  # GPT-2's head count for emb 768
    assert any("optimizer state" in note and "3 steps" in note for note in report["notes"])
    assert read_metadata(out)["book_optimizer_steps"] == "3"
    gpt, _ = load_model(out)
    with torch.no_grad():
        assert torch.allclose(gpt(IDS % 64), model.eval()(IDS % 64), atol=1e-5, rtol=0)


class Payload:
    """An arbitrary object: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


class Holder:
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_bad_pth_files_fail_with_one_line(tmp_path: Path) -> None:
    good = chapter_model().state_dict()
    torch.save(good, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save({"model": Holder()}, tmp_path / "class.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "evil2.pth").write_bytes(pickle.dumps(Payload(), protocol=2))
    torch.save({**good, "extra.weight": torch.zeros(1)}, tmp_path / "wrong_keys.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = {
        "truncated.pth": "truncated or corrupt",
        "class.pth": "Holder",
        "evil.pth": "refused",
        "evil2.pth": "system, not just tensors",
        "wrong_keys.pth": "extra.weight",
        "list.pth": "not a state dict",
    }
    for name, fragment in cases.items():
        result = invoke("convert", tmp_path / name, "--n-heads", 4, "--out", out_dir / "m.safetensors")
        one_line_error(result, fragment)
    assert list(out_dir.iterdir()) == []
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    renamed = {k.replace("final_norm.scale", "final_norm.weight"): v for k, v in good.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    one_line_error(invoke("convert", tmp_path / "renamed.pth", "--n-heads", 4), "final_norm.scale")


def test_heads_needed_for_non_gpt2_widths(tmp_path: Path) -> None:
    torch.save(chapter_model().state_dict(), tmp_path / "model.pth")
    result = invoke("convert", tmp_path / "model.pth")
    assert result.exit_code == 2
    one_line_error(result, "--n-heads", "emb_dim 32")
    one_line_error(invoke("convert", tmp_path / "model.pth", "--n-heads", 5), "divisible")
