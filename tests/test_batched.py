"""Batched decoding (gptcli.batched): every row gives the tokens it gives decoded alone
(`gptcli.generate.sample`), whatever its neighbours, its slot or the batch size."""

from __future__ import annotations

import pytest
import torch

from gptcli.batched import RaggedKVCache, decode_batch
from gptcli.config import get_preset
from gptcli.errors import UsageError
from gptcli.generate import FINISH_EOS, FINISH_LENGTH, DecodeSettings, Generation, make_generator, sample
from gptcli.model import GPT

# Ragged prompts: 1 to 9 tokens, in no order.
PROMPTS = [[6109, 3626, 6100, 345], [464], [40, 1807, 3619, 402, 271, 10899, 2138, 257, 7026],
           [50256], [1169, 3290], [314, 550, 1464, 1807, 3619, 262, 1111]]


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(1)
    return GPT(get_preset("tiny").replace(context_length=24)).eval()


def alone(model: GPT, prompts: list[list[int]], settings: DecodeSettings, seed: int | None = None) -> list[Generation]:
    return [
        sample(model, p, settings, None if seed is None else make_generator(seed + i))
        for i, p in enumerate(prompts)
    ]


def batched(model: GPT, prompts: list[list[int]], settings: DecodeSettings, batch_size: int,
            seed: int | None = None) -> list[Generation]:
    seeds = None if seed is None else [seed + i for i in range(len(prompts))]
    results: dict[int, Generation] = {}
    for event in decode_batch(model, prompts, settings, seeds, batch_size):
        assert event.generation is not None and event.row not in results
        results[event.row] = event.generation
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 16])
def test_greedy_rows_equal_alone(tiny: GPT, batch_size: int) -> None:
    settings = DecodeSettings(max_new_tokens=12)
    expected = alone(tiny, PROMPTS, settings)
    assert batched(tiny, PROMPTS, settings, batch_size) == expected


@pytest.mark.parametrize("batch_size", [3, 8])
def test_seeded_sampling_rows_equal_alone(tiny: GPT, batch_size: int) -> None:
    settings = DecodeSettings(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.9)
    expected = alone(tiny, PROMPTS, settings, seed=123)
    assert batched(tiny, PROMPTS, settings, batch_size, seed=123) == expected
    # and the rows differ from each other: the seeds are per row
    assert len({tuple(g.token_ids) for g in expected}) > 1


def test_eos_mid_batch_frees_the_slot_for_the_next_row(tiny: GPT) -> None:
    """Rows that stop at <|endoftext|> at different steps; waiting rows take their slots."""
    prompts = PROMPTS * 3
    first = alone(tiny, prompts, DecodeSettings(max_new_tokens=12))

    def stop_steps(token: int) -> set[int]:
        return {g.token_ids.index(token) if token in g.token_ids else 12 for g in first}

    # A token the rows reach at the most different steps plays <|endoftext|>.
    eos = max({t for g in first for t in g.token_ids}, key=lambda t: len(stop_steps(t)))
    assert len(stop_steps(eos)) > 2
    for settings, seed in ((DecodeSettings(max_new_tokens=12, eos_id=eos), None),
                           (DecodeSettings(max_new_tokens=12, temperature=0.02, eos_id=eos), 5)):
        expected = alone(tiny, prompts, settings, seed)
        assert {g.finish_reason for g in expected} == {FINISH_EOS, FINISH_LENGTH}
        assert batched(tiny, prompts, settings, 4, seed) == expected


def test_rows_past_the_context_slide_their_window(tiny: GPT) -> None:
    """Context 24: prompts of 1-9 tokens plus 30 new tokens outgrow it at different steps."""
    settings = DecodeSettings(max_new_tokens=30)
    expected = alone(tiny, PROMPTS, settings)
    assert batched(tiny, PROMPTS, settings, 4) == expected
    long_prompt = [PROMPTS[2] * 3][0][:24]  # exactly the context length
    assert batched(tiny, [long_prompt, [464]], settings, 2) == alone(tiny, [long_prompt, [464]], settings)


def test_samples_of_one_prompt_use_the_uniform_step(tiny: GPT) -> None:
    settings = DecodeSettings(max_new_tokens=8, temperature=0.8)
    prompts = [PROMPTS[0]] * 5
    assert batched(tiny, prompts, settings, 8, seed=9) == alone(tiny, prompts, settings, seed=9)


def test_token_events_stream_each_row_in_order(tiny: GPT) -> None:
    settings = DecodeSettings(max_new_tokens=5)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    for event in decode_batch(tiny, PROMPTS, settings, batch_size=3, tokens=True):
        if event.token is not None:
            streamed[event.row].append(event.token)
        else:
            assert event.generation is not None
            assert streamed[event.row] == event.generation.token_ids
    assert [streamed[i] for i in range(len(PROMPTS))] == [g.token_ids for g in alone(tiny, PROMPTS, settings)]


def test_ragged_cache_masks_other_rows_padding(tiny: GPT) -> None:
    """Two rows of different lengths in one cache: each step's logits equal each row's alone."""
    config = tiny.config
    cache = RaggedKVCache(config, 2, 16, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        for step in range(3):
            cache.set_lengths(torch.tensor([step, 0]) if step == 0 else cache.lengths)
            out = tiny(torch.tensor([[PROMPTS[0][step]], [PROMPTS[1][0] if step == 0 else 7]]), cache=cache)
        assert cache.lengths.tolist() == [3, 3]
        reference = tiny(torch.tensor([PROMPTS[0][:3]]))[0, -1]
    torch.testing.assert_close(out[0, -1], reference, rtol=1e-5, atol=1e-5)


def test_compacting_the_cache_leaves_no_garbage_for_masked_slots(tiny: GPT, monkeypatch) -> None:
    """Slots past a row's length are read (masked) by every ragged step, and attention multiplies them
    by a weight of 0, which NaN or inf there turns into NaN. Memory handed out uninitialised may hold
    anything (here: NaN), so a compacted cache starts from zeros."""
    real_new_empty, real_empty_like = torch.Tensor.new_empty, torch.empty_like
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: real_new_empty(t, *a, **k).fill_(torch.nan))
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: real_empty_like(t, *a, **k).fill_(torch.nan))
    cache = RaggedKVCache(tiny.config, 3, 8, torch.device("cpu"), torch.float32)
    cache.set_lengths(torch.tensor([2, 5, 3]))
    cache.keys[:, :, :, :5] = 1.0
    cache.values[:, :, :, :5] = 1.0
    cache.keep([2, 0, 0])
    assert cache.lengths.tolist() == [3, 2, 2]
    assert bool(torch.isfinite(cache.keys).all()) and bool(torch.isfinite(cache.values).all())


def test_refuses_beam_search_and_bad_sizes(tiny: GPT) -> None:
    with pytest.raises(UsageError, match="beam"):
        list(decode_batch(tiny, PROMPTS, DecodeSettings(beam_width=2)))
    with pytest.raises(UsageError, match="batch-size"):
        list(decode_batch(tiny, PROMPTS, DecodeSettings(), batch_size=0))
    with pytest.raises(UsageError, match="tokens"):
        list(decode_batch(tiny, [[]], DecodeSettings()))


# --- `gptcli sample` decodes its rows in batches -------------------------------------------------


def run_sample(*args: str, input: str | None = None) -> str:
    from typer.testing import CliRunner

    from gptcli.cli import app

    result = CliRunner().invoke(app, ["sample", *args], input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


LINES = "Every effort moves you\nI HAD always thought\n\nJack Gisburn rather a cheap genius\nso\n"


@pytest.mark.parametrize("extra", [[], ["--stream"], ["--json"]])
def test_each_line_batched_prints_what_one_row_at_a_time_prints(model_file, extra: list[str]) -> None:
    common = ["-m", str(model_file), "--each-line", "-n", "6", "-t", "1", "--seed", "4", "--num-samples", "2",
              *extra]
    one_at_a_time = run_sample(*common, "--batch-size", "1", input=LINES)
    assert len(one_at_a_time.splitlines()) == 10
    assert run_sample(*common, "--batch-size", "3", input=LINES) == one_at_a_time
    assert run_sample(*common, input=LINES) == one_at_a_time


def test_stream_of_several_samples_keeps_their_order(model_file) -> None:
    common = ["-m", str(model_file), "-n", "5", "-t", "1", "--seed", "2", "--num-samples", "3"]
    whole = run_sample(*common)
    assert run_sample(*common, "--stream") == whole
    assert whole.count("Every effort moves you") == 3


def test_batch_size_must_be_positive(model_file) -> None:
    from typer.testing import CliRunner

    from gptcli.cli import app

    result = CliRunner().invoke(app, ["sample", "-m", str(model_file), "--batch-size", "0"])
    assert result.exit_code == 2
    assert "--batch-size must be at least 1" in result.output


def test_prefill_groups_keep_padding_small() -> None:
    from gptcli.batched import PADDING_SHARE, Row, _length_groups

    lengths = [3, 300, 5, 40, 41, 7, 2, 290, 45, 1]
    entries = [(slot, Row(slot, [1] * n, n, None)) for slot, n in enumerate(lengths)]
    groups = _length_groups(entries)
    assert sorted(slot for group in groups for slot, _ in group) == list(range(len(lengths)))
    for group in groups:
        real = [len(row.ids) - 1 for _, row in group]
        assert len(real) * max(real) <= (1 + PADDING_SHARE) * sum(real) or len(real) == 1 or max(real) == 0
    assert len(groups) < len(lengths)  # similar lengths do share a forward pass
