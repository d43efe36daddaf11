"""Token log-probabilities: `sample --logprobs K` (gptcli.logprobs through the batched decoder) and
`eval --per-token`, each compared with a direct softmax of the model's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.batched import decode_batch
from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.evaluate import evaluate_per_token, evaluate_sources
from gptcli.generate import DecodeSettings, Generation, sequence_logprob
from gptcli.logprobs import openai_logprobs
from gptcli.model import GPT
from gptcli.modelfile import load_model
from gptcli.tokenizer import encode, token_text

runner = CliRunner()
PROMPTS = [[6109, 3626, 6100, 345], [464], [40, 1807, 3619, 402, 271]]


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(3)
    return GPT(get_preset("tiny").replace(context_length=16)).eval()


def direct_logprobs(model: GPT, prompt: list[int], new: list[int]) -> torch.Tensor:
    """log softmax of the model's logits at each new token's step (rows = new tokens), no cache."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : len(prompt) - 1 + len(new)]
    return torch.log_softmax(logits.float(), dim=-1)


def drawn_logprobs(raw: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """The distribution sampled from, built here from the raw log-probabilities (top-k, T, top-p)."""
    logits = raw.clone()
    if settings.top_k is not None:
        kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = -math.inf
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p is not None:
        for row in probs:
            order = row.argsort(descending=True, stable=True)
            before = row[order].cumsum(0) - row[order]
            row[order[before >= settings.top_p]] = 0.0
            row /= row.sum()
    return probs.log()


def decoded(model: GPT, settings: DecodeSettings, k: int, batch_size: int) -> list[Generation]:
    found = {}
    for event in decode_batch(model, PROMPTS, settings, [7, 8, 9], batch_size, logprobs=k):
        if event.generation is not None:
            found[event.row] = event.generation
    return [found[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("settings", [
    DecodeSettings(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.8, stop_at_eos=False),
    DecodeSettings(max_new_tokens=6, temperature=1.5, stop_at_eos=False),
    DecodeSettings(max_new_tokens=6, stop_at_eos=False),  # greedy: the model's own distribution
])
def test_batched_logprobs_equal_a_direct_softmax(tiny: GPT, settings: DecodeSettings) -> None:
    k = 5
    for batch_size in (1, 3):  # per row, alone or batched
        for prompt, generation in zip(PROMPTS, decoded(tiny, settings, k, batch_size), strict=True):
            records = generation.token_logprobs
            assert records is not None and [r.token for r in records] == generation.token_ids
            raw = direct_logprobs(tiny, prompt, generation.token_ids)
            drawn = raw if settings.temperature == 0 else drawn_logprobs(raw, settings)
            for step, record in enumerate(records):
                token = record.token
                assert record.raw_logprob == pytest.approx(float(raw[step, token]), abs=1e-4)
                assert record.logprob == pytest.approx(float(drawn[step, token]), abs=1e-4)
                finite = drawn[step][torch.isfinite(drawn[step])]
                want = finite.sort(descending=True).values[:k].tolist()
                assert [lp for _, lp in record.top] == pytest.approx(want, abs=1e-4)
                assert all(math.isfinite(lp) for _, lp in record.top)  # removed tokens are never listed
                assert record.top[0][1] >= record.logprob - 1e-6


def test_top_p_lists_only_the_tokens_it_keeps(tiny: GPT) -> None:
    settings = DecodeSettings(max_new_tokens=3, temperature=1.0, top_p=1e-6, stop_at_eos=False)
    for generation in decoded(tiny, settings, 20, 3):
        for record in generation.token_logprobs or []:
            assert len(record.top) == 1 and record.logprob == pytest.approx(0.0, abs=1e-6)  # one token, p = 1


def test_openai_layout_and_unique_token_texts(tokenizer) -> None:
    from gptcli.logprobs import TokenLogprob

    records = [TokenLogprob(262, -0.5, -1.0, ((262, -0.5), (257, -1.5)))]
    laid_out = openai_logprobs(records, lambda t: token_text(tokenizer, t))
    assert laid_out == {"tokens": [" the"], "token_logprobs": [-0.5],
                        "top_logprobs": [{" the": -0.5, " a": -1.5}], "raw_token_logprobs": [-1.0]}
    # A token holding part of a character gets OpenAI's bytes: text; every id has its own text.
    partial = [t for t in range(256) if tokenizer.decode_single_token_bytes(t)[0] >= 0x80]
    assert token_text(tokenizer, partial[0]).startswith("bytes:\\x")
    assert token_text(tokenizer, 50300) == "<|token 50300|>"
    texts = {token_text(tokenizer, t) for t in range(tokenizer.n_vocab)}
    assert len(texts) == tokenizer.n_vocab


# --- the commands ------------------------------------------------------------------------------------


def sample(*args: str):
    return runner.invoke(app, ["sample", *args])


def test_sample_json_logprobs(model_file: Path, tokenizer) -> None:
    result = sample("-m", str(model_file), "-n", "5", "-t", "0.9", "--top-k", "30", "--seed", "1",
                    "--num-samples", "2", "--logprobs", "3", "--json", "--no-stop-at-eos", "Every effort")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    for record in records:
        logprobs = record["logprobs"]
        assert logprobs["tokens"] == [token_text(tokenizer, t) for t in record["token_ids"]]
        assert len(logprobs["token_logprobs"]) == len(logprobs["raw_token_logprobs"]) == 5
        assert all(len(top) == 3 for top in logprobs["top_logprobs"])
        assert all(lp <= 0 for lp in logprobs["token_logprobs"])
        # Sampling at T < 1 from the top 30 makes the chosen tokens likelier than the raw model says.
        assert sum(logprobs["token_logprobs"]) > sum(logprobs["raw_token_logprobs"])


def test_sample_table_and_beam_sequence_logprob(model_file: Path, tokenizer) -> None:
    result = sample("-m", str(model_file), "-n", "4", "--logprobs", "2", "--no-stop-at-eos", "Hello")
    assert result.exit_code == 0, result.output
    assert "model logprob" in result.stdout and "top 2 (logprob)" in result.stdout
    beam = sample("-m", str(model_file), "-n", "4", "--beam-width", "3", "--json", "--no-stop-at-eos", "Hello")
    record = json.loads(beam.stdout)
    ids = encode(tokenizer, "Hello")
    model, _ = load_model(str(model_file))
    assert record["sequence_logprob"] == pytest.approx(sequence_logprob(model.eval(), ids, record["token_ids"]),
                                                       abs=1e-3)
    assert record["score"] == pytest.approx(record["sequence_logprob"] / 4)
    table = sample("-m", str(model_file), "-n", "4", "--beam-width", "2", "--logprobs", "0", "Hello")
    assert "sequence log-probability" in table.stdout


@pytest.mark.parametrize("args", [["--logprobs", "21"], ["--logprobs", "-1"], ["--logprobs", "2", "--each-line"]])
def test_sample_bad_logprobs_exit_2(model_file: Path, args: list[str]) -> None:
    result = sample("-m", str(model_file), *args, "Hello")
    assert result.exit_code == 2 and "--logprobs" in result.output and "Traceback" not in result.output


def test_per_token_losses_equal_a_direct_softmax(tiny: GPT) -> None:
    tokens = [464, 3290, 318, 257, 1332, 13, 632, 318, 257, 922, 1110, 284, 467, 329, 257, 2513, 13, 50256,
              40, 588]  # 20 tokens: two windows of the context length 16
    (result, ids, losses), = evaluate_per_token(tiny, [("text", tokens)], stride=8, batch_size=2)
    assert ids.tolist() == tokens and len(losses) == len(tokens) - 1
    for i, loss in enumerate(losses.tolist()):
        start = 0 if i < 16 else 8  # the window that scores token i + 1 (context 16, stride 8)
        context = torch.tensor([tokens[start : i + 1]])
        with torch.no_grad():
            want = -torch.log_softmax(tiny(context)[0, -1].float(), dim=-1)[tokens[i + 1]]
        assert loss == pytest.approx(float(want), abs=1e-4)
    plain, = evaluate_sources(tiny, [("text", tokens)], stride=8, batch_size=2)
    assert result.loss == pytest.approx(plain.loss, rel=1e-6)


def test_eval_per_token_table_and_json(model_file: Path) -> None:
    text = "Every effort moves you"
    plain = runner.invoke(app, ["eval", "-m", str(model_file), "--json", "-"], input=text)
    per_token = runner.invoke(app, ["eval", "-m", str(model_file), "--per-token", "--json", "-"], input=text)
    assert per_token.exit_code == 0, per_token.output
    record, want = json.loads(per_token.stdout), json.loads(plain.stdout)
    assert record["loss"] == pytest.approx(want["loss"], rel=1e-6) and record["tokens"] == want["tokens"]
    rows = record["per_token"]
    assert [r["token"] for r in rows] == [" effort", " moves", " you"]
    assert sum(r["loss"] for r in rows) / len(rows) == pytest.approx(record["loss"], rel=1e-6)
    assert all(r["prob"] == pytest.approx(math.exp(-r["loss"])) for r in rows)
    table = runner.invoke(app, ["eval", "-m", str(model_file), "--per-token", "-"], input=text)
    assert '" moves"' in table.stdout and f"{want['loss']:.4f}" in table.stdout and "perplexity" in table.stdout
    refused = runner.invoke(app, ["eval", "--run", str(model_file.parent), "--per-token"])
    assert refused.exit_code == 2 and "--per-token" in refused.output
