"""`gptcli sample` and its core (gptcli.generate): the chapter's decoding, KV-cache equivalence with
the chapter's uncached loop, top-k/top-p/beam search, seeds, and the command's input/output."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.chapter import GPTModel, config_dict, generate_text, to_gptcli_state_dict
from gptcli.cli import app
from gptcli.config import GPTConfig, get_preset
from gptcli.errors import UsageError
from gptcli.generate import (
    FINISH_EOS,
    FINISH_LENGTH,
    DecodeSettings,
    beam_search,
    generate,
    make_generator,
    sample,
    sequence_logprob,
    stream,
    top_k_filter,
    top_p_filter,
)
from gptcli.model import GPT
from gptcli.modelfile import save_model

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"
runner = CliRunner()


def chapter_pair(config: GPTConfig, seed: int = 0) -> tuple[GPTModel, GPT]:
    """The chapter's GPTModel and gptcli's GPT holding the same weights, both in eval mode."""
    torch.manual_seed(seed)
    chapter = GPTModel(config_dict(config)).eval()
    model = GPT(config)
    model.load_state_dict(to_gptcli_state_dict(chapter.state_dict(), config.n_layers))
    return chapter, model.eval()


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(1)
    return GPT(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def peaked() -> GPT:
    """A confident model (sharper next-token distributions), where beam search has something to find."""
    torch.manual_seed(2)
    model = GPT(get_preset("tiny").replace(context_length=32)).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(10)
    return model


# --- equivalence with the chapter's uncached loop ---------------------------------------------------


@pytest.mark.parametrize(("context_length", "new_tokens"), [(64, 30), (16, 40), (4, 12)])
def test_cached_greedy_equals_chapter_loop(context_length: int, new_tokens: int) -> None:
    # (16, 40) and (4, 12) run past the context length: the chapter's sliding window takes over.
    chapter, model = chapter_pair(get_preset("tiny").replace(context_length=context_length))
    prompt = torch.tensor([PROMPT])
    expected = generate_text(chapter, prompt, new_tokens, context_length)[0, len(PROMPT):].tolist()
    assert generate(model, prompt, max_new_tokens=new_tokens, stop_at_eos=False) == [expected]
    assert generate(model, prompt, max_new_tokens=new_tokens, stop_at_eos=False, use_cache=False) == [expected]


def test_prompt_longer_than_context_uses_last_window() -> None:
    chapter, model = chapter_pair(get_preset("tiny").replace(context_length=8))
    prompt = torch.tensor([list(range(100, 120))])
    expected = generate_text(chapter, prompt, 10, 8)[0, 20:].tolist()
    assert generate(model, prompt, max_new_tokens=10, stop_at_eos=False) == [expected]


def test_sampling_equals_chapter_loop_with_same_seed() -> None:
    # The chapter's order: top-k on the logits, then temperature, softmax and multinomial.
    chapter, model = chapter_pair(get_preset("tiny").replace(context_length=16))
    prompt = torch.tensor([PROMPT])
    torch.manual_seed(7)
    expected = generate_text(chapter, prompt, 30, 16, temperature=1.4, top_k=25)[0, len(PROMPT):].tolist()
    torch.manual_seed(7)
    got = generate(model, prompt, max_new_tokens=30, temperature=1.4, top_k=25, stop_at_eos=False)
    assert got == [expected]
    # `--seed 7` (a generator of its own) draws the same numbers as the chapter's torch.manual_seed(7).
    seeded = generate(model, prompt, max_new_tokens=30, temperature=1.4, top_k=25, stop_at_eos=False,
                      generator=make_generator(7))
    assert seeded == [expected]


def test_zero_new_tokens(tiny: GPT) -> None:
    assert generate(tiny, torch.tensor([PROMPT]), max_new_tokens=0) == [[]]
    assert generate(tiny, PROMPT, max_new_tokens=0, beam_width=2) == [[]]


def test_greedy_draws_no_random_numbers(tiny: GPT) -> None:
    # Training samples greedily between steps; that must not move its RNG stream.
    state = torch.get_rng_state()
    generate(tiny, torch.tensor([PROMPT]), max_new_tokens=5, stop_at_eos=False)
    assert torch.equal(state, torch.get_rng_state())


# --- decoding strategies ------------------------------------------------------------------------------


def test_same_seed_same_tokens(tiny: GPT) -> None:
    settings = DecodeSettings(max_new_tokens=20, temperature=1.0, top_k=50, stop_at_eos=False)
    first = sample(tiny, PROMPT, settings, make_generator(42)).token_ids
    again = sample(tiny, PROMPT, settings, make_generator(42)).token_ids
    other = sample(tiny, PROMPT, settings, make_generator(43)).token_ids
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    "settings",
    [
        DecodeSettings(max_new_tokens=20, temperature=1.5, top_k=1, stop_at_eos=False),
        DecodeSettings(max_new_tokens=20, temperature=1.5, top_p=1e-6, stop_at_eos=False),
        DecodeSettings(max_new_tokens=20, temperature=0.0, top_k=5, top_p=0.5, stop_at_eos=False),
    ],
    ids=["top-k 1", "tiny top-p", "filters at temperature 0"],
)
def test_degenerate_sampling_equals_greedy(tiny: GPT, settings: DecodeSettings) -> None:
    greedy = sample(tiny, PROMPT, DecodeSettings(max_new_tokens=20, stop_at_eos=False)).token_ids
    assert sample(tiny, PROMPT, settings, make_generator(0)).token_ids == greedy


def test_beam_width_one_equals_greedy(tiny: GPT) -> None:
    greedy = sample(tiny, PROMPT, DecodeSettings(max_new_tokens=20, stop_at_eos=False)).token_ids
    [beam] = beam_search(tiny, PROMPT, DecodeSettings(max_new_tokens=20, beam_width=1, stop_at_eos=False))
    assert beam.token_ids == greedy


@pytest.mark.parametrize("prompt", [PROMPT, [11, 290, 262], [50256]])
def test_beam_search_at_least_as_likely_as_greedy(peaked: GPT, prompt: list[int]) -> None:
    greedy = sample(peaked, prompt, DecodeSettings(max_new_tokens=12, stop_at_eos=False)).token_ids
    settings = DecodeSettings(max_new_tokens=12, beam_width=4, stop_at_eos=False)
    [best] = beam_search(peaked, prompt, settings)
    assert len(best.token_ids) == len(greedy) == 12
    assert best.logprob == pytest.approx(sequence_logprob(peaked, prompt, best.token_ids), abs=1e-3)
    assert best.logprob >= sequence_logprob(peaked, prompt, greedy) - 1e-4


def test_wide_beam_is_exact_search() -> None:
    # With vocab ** (steps - 1) beams nothing is pruned: the best beam is the most likely sequence.
    vocab, steps = 5, 3
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=vocab, context_length=8, emb_dim=16, n_heads=2, n_layers=2)).eval()
    prompt = [1, 2]
    sequences = itertools.product(range(vocab), repeat=steps)
    everything = {seq: sequence_logprob(model, prompt, list(seq)) for seq in sequences}
    settings = DecodeSettings(max_new_tokens=steps, beam_width=vocab ** (steps - 1), stop_at_eos=False)
    [best] = beam_search(model, prompt, settings)
    assert best.logprob == pytest.approx(max(everything.values()), abs=1e-4)
    greedy = sample(model, prompt, DecodeSettings(max_new_tokens=steps, stop_at_eos=False)).token_ids
    assert best.logprob >= everything[tuple(greedy)] - 1e-5


@pytest.mark.parametrize(("context_length", "new_tokens"), [(32, 20), (16, 40)])
def test_cached_beam_equals_uncached_beam(context_length: int, new_tokens: int) -> None:
    _, model = chapter_pair(get_preset("tiny").replace(context_length=context_length))
    settings = DecodeSettings(max_new_tokens=new_tokens, beam_width=3, stop_at_eos=False)
    cached = beam_search(model, PROMPT, settings, num_return=3)
    uncached = beam_search(model, PROMPT, settings, num_return=3, use_cache=False)
    assert [b.token_ids for b in cached] == [b.token_ids for b in uncached]
    assert [b.logprob for b in cached] == pytest.approx([b.logprob for b in uncached], abs=1e-4)
    assert all(len(b.token_ids) == new_tokens for b in cached)


def test_beams_come_best_first_and_distinct(peaked: GPT) -> None:
    settings = DecodeSettings(max_new_tokens=6, beam_width=4, stop_at_eos=False)
    beams = beam_search(peaked, PROMPT, settings, num_return=4)
    scores = [b.score for b in beams]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(b.token_ids) for b in beams}) == 4


def test_stops_at_eos(tiny: GPT) -> None:
    greedy = sample(tiny, PROMPT, DecodeSettings(max_new_tokens=10, stop_at_eos=False)).token_ids
    eos = greedy[3]  # pretend the 4th greedy token ends the text
    first = greedy.index(eos)
    stopped = sample(tiny, PROMPT, DecodeSettings(max_new_tokens=10, eos_id=eos))
    assert stopped.token_ids == greedy[:first]
    assert stopped.finish_reason == FINISH_EOS
    assert list(stream(tiny, PROMPT, DecodeSettings(max_new_tokens=10, eos_id=eos))) == greedy[:first]
    full = sample(tiny, PROMPT, DecodeSettings(max_new_tokens=10, eos_id=eos, stop_at_eos=False))
    assert full.token_ids == greedy and full.finish_reason == FINISH_LENGTH
    [beam] = beam_search(tiny, PROMPT, DecodeSettings(max_new_tokens=10, beam_width=1, eos_id=eos))
    assert beam.token_ids == greedy[:first] and beam.finish_reason == FINISH_EOS


def test_top_k_and_top_p_filters() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 99), logits)
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    assert top_p_filter(probs, 0.6)[0].tolist() == pytest.approx([0.0, 0.625, 0.375])
    assert top_p_filter(probs, 0.5)[0].tolist() == pytest.approx([0.0, 1.0, 0.0])  # reaches p: stop
    assert top_p_filter(probs, 1e-9)[0].tolist() == pytest.approx([0.0, 1.0, 0.0])  # at least one
    assert top_p_filter(probs, 1.0)[0].tolist() == pytest.approx(probs[0].tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.01},
        {"top_p": float("nan")}, {"beam_width": 0}, {"max_new_tokens": -1}, {"length_penalty": float("inf")},
        {"beam_width": 2, "temperature": 1.0}, {"beam_width": 2, "top_k": 5},
    ],
)
def test_invalid_settings(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        DecodeSettings(**kwargs).validate()


# --- the command ------------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "run" / "model.safetensors"
    save_model(path, GPT(get_preset("tiny")))
    return path


def invoke(*args: str, input: str | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(app, ["sample", *args], input=input)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_latest_run_and_default_prompt(model_file: Path, isolated_env: Path) -> None:
    (isolated_env / "runs").mkdir()
    os.symlink(model_file.parent, isolated_env / "runs" / "latest")
    result = invoke("-n", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Every effort moves you")
    assert "loaded" in result.stderr


def test_no_model_says_how_to_get_one() -> None:
    result = invoke("hi")
    assert result.exit_code == 1
    assert "gptcli train" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--temperature", "-1"], ["--top-k", "0"], ["--top-p", "0"], ["--top-p", "1.5"], ["--beam-width", "0"],
        ["--max-new-tokens", "0"], ["--num-samples", "0"], ["--seed", "-1"],
        ["--beam-width", "2", "--temperature", "0.7"], ["--beam-width", "2", "--num-samples", "3"],
        ["--beam-width", "2", "--stream"], ["--stream", "--json"], ["--device", "tpu"], ["--dtype", "fp16"],
        ["--threads", "0"], ["word " * 80],  # 80 tokens: longer than the tiny model's context of 64
    ],
)
def test_invalid_values_exit_2(model_file: Path, args: list[str]) -> None:
    result = invoke("-m", str(model_file), *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("core", "args", "message"),
    [
        ({"batch_size": 0}, ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        ({"logprobs": 21}, ["--logprobs", "21"], "--logprobs must be between 0 and 20, got 21"),
        ({"seed": -1}, ["--seed", "-1"], "--seed must be between 0 and 9223372036854775806, got -1"),
        ({"min_new_tokens": 1}, ["-n", "0"], "--max-new-tokens must be at least 1, got 0"),
    ],
)
def test_the_core_and_the_command_refuse_alike(tiny: GPT, model_file: Path, core: dict, args: list[str],
                                               message: str) -> None:
    """One check, one message: `DecodeSettings.validate` (what decode_batch calls) and `gptcli sample`."""
    from gptcli.batched import decode_batch

    settings = DecodeSettings(max_new_tokens=0 if "min_new_tokens" in core else 5)
    with pytest.raises(UsageError) as raised:
        if "batch_size" in core or "logprobs" in core:
            list(decode_batch(tiny, [PROMPT], settings, **core))
        else:
            settings.validate(**core)
    assert str(raised.value) == message
    result = invoke("Hi", "-m", str(model_file), *args)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == f"error: {message}"


def test_threads_sets_torchs_thread_count(model_file: Path) -> None:
    import torch

    try:
        result = invoke("Hi", "-m", str(model_file), "-n", "3", "--threads", "2")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


def test_json_output(model_file: Path) -> None:
    result = invoke("Hello", "-m", str(model_file), "-n", "7", "-t", "1", "--top-k", "20", "--seed", "5",
                    "--num-samples", "2", "--json")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert len(records) == 2
    for i, record in enumerate(records):
        assert set(record) == {"prompt", "completion", "token_ids", "finish_reason", "model", "dtype", "seed",
                               "settings"}
        assert record["prompt"] == "Hello" and record["seed"] == 5 + i
        assert record["finish_reason"] in ("length", "eos")
        assert record["settings"]["top_k"] == 20 and record["model"] == str(model_file)
    # Sample i uses seed + i: the second sample is reproducible on its own.
    alone = json_lines(invoke("Hello", "-m", str(model_file), "-n", "7", "-t", "1", "--top-k", "20",
                              "--seed", "6", "--json").stdout)
    assert alone[0]["token_ids"] == records[1]["token_ids"]


def test_same_seed_same_text(model_file: Path) -> None:
    args = ["-m", str(model_file), "-n", "10", "-t", "1.2", "--top-p", "0.9", "--seed", "11"]
    first, again = invoke(*args), invoke(*args)
    assert first.exit_code == 0 and first.stdout == again.stdout


def test_prompt_from_stdin(model_file: Path) -> None:
    piped = invoke("-m", str(model_file), "-n", "4", input="Hello there\n")
    dash = invoke("-", "-m", str(model_file), "-n", "4", input="Hello there\n")
    arg = invoke("Hello there", "-m", str(model_file), "-n", "4")
    assert piped.exit_code == 0, piped.output
    assert piped.stdout.startswith("Hello there") and piped.stdout == dash.stdout == arg.stdout


def test_each_line(model_file: Path) -> None:
    prompts = "The cat\nA dog\nOnce upon a time\n"
    result = invoke("-m", str(model_file), "-n", "4", "--each-line", "--json", input=prompts)
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in json_lines(result.stdout)] == ["The cat", "A dog", "Once upon a time"]
    text = invoke("-m", str(model_file), "-n", "4", "--each-line", input=prompts)
    lines = text.stdout.splitlines()
    assert len(lines) == 3 and lines[2].startswith("Once upon a time")


def test_stream_and_completion_only(model_file: Path) -> None:
    plain = invoke("Hello", "-m", str(model_file), "-n", "8")
    streamed = invoke("Hello", "-m", str(model_file), "-n", "8", "--stream")
    completion = invoke("Hello", "-m", str(model_file), "-n", "8", "--completion-only")
    record = json_lines(invoke("Hello", "-m", str(model_file), "-n", "8", "--json").stdout)[0]
    assert plain.stdout == streamed.stdout == "Hello" + record["completion"] + "\n"
    assert completion.stdout == record["completion"] + "\n"


def test_beam_search_and_bf16_from_the_shell(model_file: Path) -> None:
    beams = invoke("Hello", "-m", str(model_file), "-n", "5", "--beam-width", "3", "--num-samples", "2",
                   "--json", "--verbose")
    assert beams.exit_code == 0, beams.output
    records = json_lines(beams.stdout)
    assert len(records) == 2 and records[0]["token_ids"] != records[1]["token_ids"]
    assert records[0]["seed"] is None  # deterministic: no seed involved
    assert "tokens/s" in beams.stderr
    bf16 = invoke("Hello", "-m", str(model_file), "-n", "5", "--dtype", "bf16", "--device", "cpu")
    assert bf16.exit_code == 0, bf16.output
