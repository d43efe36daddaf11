"""`--dtype int8` and `--dtype int4` (gptcli.quantize) and the precision choices of sample and eval
(gptcli.runtime): their error and perplexity bounds, the kernels against the dequantizing paths,
native-bf16 detection and the fp32 fallback where it is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.errors import UsageError
from gptcli.evaluate import sliding_window_loss
from gptcli.kernels.dispatch import ENV_SWITCH
from gptcli.model import GPT
from gptcli.quantize import Int4Linear, Int8Linear, is_quantized, quantize_model
from gptcli.runtime import BF16_ENV, cpu_has_native_bf16, resolve_precision
from gptcli.tokenizer import encode
from tests.conftest import VERDICT

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tokenizer) -> tuple[GPT, list[int]]:
    """A tiny model trained briefly on the-verdict (a random model's perplexity would be ~the vocabulary
    whatever the weights)."""
    tokens = encode(tokenizer, VERDICT.read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = GPT(get_preset("tiny").replace(context_length=32, drop_rate=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(tokens)
    for _ in range(60):
        starts = torch.randint(0, len(tokens) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokens


def test_int8_linear_is_within_rounding_of_the_float_layer() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8 and quantized.scales.shape == (96,)
    # Each weight is off by at most half a step of its row's scale.
    error = (quantized.dequantized(torch.float32) - linear.weight).abs()
    assert bool((error <= quantized.scales[:, None] / 2 + 1e-7).all())
    with torch.inference_mode():
        for rows in (1, 4, 100):  # the packed kernel (bf16 activations) and the dequantizing path
            x = torch.randn(rows, 64)
            torch.testing.assert_close(quantized(x), linear(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize(("bits", "layer"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_every_linear_and_the_tied_head_are_quantized(bits: str, layer: type) -> None:
    model = GPT(get_preset("tiny").replace(tie_weights=True)).eval()
    quantize_model(model, bits=bits)
    assert is_quantized(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.out_head, layer) and model.tok_emb.weight.dtype == torch.float32
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)


def test_kernels_switch_turns_the_int8_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under GPTCLI_KERNELS=0 a decoding step multiplies the dequantized weight in float32 (the plain
    path, exactly); with the kernel, bf16 activations make it differ in the last bits."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 96)
    quantized = Int8Linear(linear)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        plain = torch.nn.functional.linear(x, quantized.dequantized(torch.float32), quantized.bias)
        assert not torch.equal(quantized(x), plain)
        monkeypatch.setenv(ENV_SWITCH, "0")
        assert torch.equal(quantized(x), plain)


@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (50257, 32), (77, 48)])
def test_int4_linear_is_within_a_step_of_the_float_layer(out_features: int, in_features: int) -> None:
    """Each weight within half a step of its group (plus the bf16 rounding of scale and offset); the
    vocabulary's 50257 rows are padded for the kernel; 48 inputs (not a multiple of 32) make one group."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    quantized = Int4Linear(linear)
    assert quantized.group == (32 if in_features % 32 == 0 else in_features)
    scales = quantized.scales_and_offsets[..., 0].float().t()[:out_features]  # (out, groups)
    error = (quantized.dequantized(torch.float32) - linear.weight).abs().view(out_features, -1, quantized.group)
    assert bool((error <= scales[:, :, None] * 0.51 + 1e-2 * linear.weight.abs().max()).all())
    with torch.inference_mode():
        x = torch.randn(3, in_features)
        relative = (quantized(x) - linear(x)).norm() / linear(x).norm()
    assert relative < 0.1


@pytest.mark.parametrize("rows", [1, 4, 100])
def test_int4_kernel_equals_the_dequantizing_path(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """torch's int4 kernel (bf16 activations and output) against GPTCLI_KERNELS=0's dequantized
    weight: the same function up to bf16 rounding."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 200)
    fast = Int4Linear(linear)
    monkeypatch.setenv(ENV_SWITCH, "0")
    plain = Int4Linear(linear)
    assert fast.packed and not plain.packed
    torch.testing.assert_close(fast.dequantized(torch.float32), plain.dequantized(torch.float32), rtol=1e-2, atol=1e-3)
    with torch.inference_mode():
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fast(x), plain(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "bound"), [("int8", 0.01), ("int4", 0.03)])
def test_quantized_perplexity_near_fp32(trained: tuple[GPT, list[int]], bits: str, bound: float) -> None:
    import copy

    model, tokens = trained
    fp32_loss, _ = sliding_window_loss(model, tokens, batch_size=16)
    quantized = quantize_model(copy.deepcopy(model), bits=bits)
    with torch.inference_mode():
        quantized_loss, _ = sliding_window_loss(quantized, tokens, batch_size=16)
    ppl32, ppl_q = torch.tensor(fp32_loss).exp().item(), torch.tensor(quantized_loss).exp().item()
    assert ppl32 < 2000  # it learned something
    assert abs(ppl_q - ppl32) / ppl32 < bound


@pytest.mark.parametrize(("env", "native"), [("0", False), ("1", True)])
def test_bf16_detection_can_be_simulated(monkeypatch: pytest.MonkeyPatch, env: str, native: bool) -> None:
    monkeypatch.setenv(BF16_ENV, env)
    assert cpu_has_native_bf16() is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32", None)
    precision, note = resolve_precision("bf16", "cpu")
    assert precision == ("bf16" if native else "fp32")
    assert (note is None) is native
    assert resolve_precision("int8", "cpu") == ("int8", None)
    assert resolve_precision("bf16", "cpu", one_row=True) == ("bf16", None)  # decoding one row pays anyway
    if not native:
        with pytest.raises(UsageError, match="no native bf16"):
            resolve_precision("bf16", "cpu", strict=True)


def test_sample_runs_fp32_where_bf16_is_not_native(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BF16_ENV, "0")
    args = ["sample", "Hello", "-m", str(model_file), "-n", "3", "--device", "cpu", "--json", "--num-samples", "2"]
    result = runner.invoke(app, [*args, "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "no native bf16" in result.stderr and "running fp32" in result.stderr
    assert {json.loads(line)["dtype"] for line in result.stdout.splitlines()} == {"fp32"}
    # One row decoded alone stays bf16: prepacked bf16 weights still halve the bytes each step reads.
    alone = runner.invoke(app, [*args[:-2], "--dtype", "bf16", "--strict-precision"])
    assert alone.exit_code == 0 and json.loads(alone.stdout)["dtype"] == "bf16", alone.output
    strict = runner.invoke(app, [*args, "--dtype", "bf16", "--strict-precision"])
    assert strict.exit_code == 2 and strict.stderr.splitlines()[-1].startswith("error: --dtype bf16")
    assert json.loads(runner.invoke(app, [*args[:-2], "--dtype", "auto"]).stdout)["dtype"] == "fp32"
    monkeypatch.setenv(BF16_ENV, "1")
    assert json.loads(runner.invoke(app, [*args[:-2], "--dtype", "auto"]).stdout)["dtype"] == "bf16"


@pytest.mark.parametrize(("bits", "bound"), [("int8", 0.01), ("int4", 0.03)])
def test_sample_and_eval_take_quantized_weights(model_file: Path, bits: str, bound: float) -> None:
    sample = runner.invoke(app, ["sample", "Hello", "-m", str(model_file), "-n", "4", "--dtype", bits, "--json"])
    assert sample.exit_code == 0, sample.output
    assert json.loads(sample.stdout)["dtype"] == bits and f"cpu {bits}" in sample.stderr
    scores = {}
    for dtype in ("fp32", bits):
        result = runner.invoke(app, ["eval", str(VERDICT), "-m", str(model_file), "--dtype", dtype, "--json",
                                     "--max-tokens", "300"])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["dtype"] == dtype
        scores[dtype] = record["perplexity"]
    assert abs(scores[bits] - scores["fp32"]) / scores["fp32"] < bound
