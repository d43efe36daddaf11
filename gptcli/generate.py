"""Text generation: the chapter's decoding (greedy, temperature, top-k) plus top-p and beam search,
decoded incrementally with a key/value cache. The entry points for one prompt live here.

One engine decodes (gptcli.batched): decoding one prompt is a batch of one row, so a row gives the
same tokens alone as beside others (`gptcli sample --batch-size`). How each token is picked is
gptcli.sampling's; beam search (gptcli.beam) runs its own loop over the engine's batch.

While prompt + new tokens fit the context length, the prompt is prefilled once into a KV cache and
each step feeds one token. Past the context length the chapter conditions on the last
`context_length` tokens; positions are absolute, so every cached key changes as the window slides:
each step then runs the whole window again, exactly like the chapter's uncached loop.

The core never prints: `stream` yields token ids, the other functions return them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from gptcli.beam import beam_search
from gptcli.errors import UsageError
from gptcli.sampling import (
    DEFAULT_BATCH_SIZE,
    FINISH_EOS,
    FINISH_LENGTH,
    MAX_SEED,
    DecodeSettings,
    Generation,
    finish_reason,
    make_generator,
    sampling_probs,
    top_k_filter,
    top_p_filter,
)
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT

__all__ = [
    "DEFAULT_BATCH_SIZE", "FINISH_EOS", "FINISH_LENGTH", "MAX_SEED", "DecodeSettings", "Generation", "beam_search",
    "decode", "finish_reason", "generate", "make_generator", "sample", "sampling_probs", "sequence_logprob",
    "stream", "top_k_filter", "top_p_filter",
]


def stream(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (greedy or sampling; beam search cannot stream).

    Stops after `max_new_tokens`, or at <|endoftext|> (not yielded) when `stop_at_eos`. Samples
    from `generator` (default: torch's global one). The model should be in eval mode.
    """
    from gptcli.batched import Row, decode_rows, prompt_list

    settings = settings or DecodeSettings()
    settings.validate()
    if settings.beam_width > 1:
        raise UsageError("beam search returns whole sequences; it cannot stream")
    ids = prompt_list(prompt_ids)
    for event in decode_rows(model, [Row(0, ids, len(ids), generator)], settings, tokens=True, use_cache=use_cache):
        if event.token is not None:
            yield event.token


def sample(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """One greedy or sampled continuation (see `stream`)."""
    settings = settings or DecodeSettings()
    tokens = list(stream(model, prompt_ids, settings, generator, use_cache))
    return Generation(tokens, finish_reason(len(tokens), settings))


def decode(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """Greedy, sampled or beam-searched continuation, whichever `settings` ask for."""
    if settings.beam_width > 1:
        return beam_search(model, prompt_ids, settings, use_cache=use_cache)[0]
    return sample(model, prompt_ids, settings, generator, use_cache)


def generate(
    model: GPT,
    prompt: torch.Tensor | Sequence[int],
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beam_width: int = 1,
    length_penalty: float = 1.0,
    stop_at_eos: bool = True,
    eos_id: int = EOT_ID,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new token ids for each row of `prompt` ((batch, length) tensor, or one list of ids).

    Rows are decoded one after the other, each drawing from `generator` in turn (training's epoch
    sample calls this between optimizer steps: each call packs the weights as they are then)."""
    import torch

    from gptcli.kernels.decoding import PackedWeights

    settings = DecodeSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        beam_width=beam_width, length_penalty=length_penalty, stop_at_eos=stop_at_eos, eos_id=eos_id,
    )
    rows = prompt.tolist() if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else [list(prompt)]
    with PackedWeights():  # one packing for all rows
        return [decode(model, row, settings, generator, use_cache).token_ids for row in rows]


def sequence_logprob(model: GPT, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> float:
    """Summed log-probability of `new_ids` following `prompt_ids` (all within the context length)."""
    import torch

    from gptcli.batched import prompt_list
    from gptcli.kernels.decoding import PackedWeights

    ids = list(prompt_ids) + list(new_ids)
    if len(ids) > model.config.context_length + 1:
        raise ValueError("sequence_logprob needs prompt + new tokens within the context length")
    if not new_ids:
        return 0.0
    inputs = torch.tensor([prompt_list(ids[:-1])], device=model.tok_emb.weight.device)
    with PackedWeights(), torch.inference_mode():
        logprobs = torch.log_softmax(model(inputs)[0].float(), dim=-1)
        targets = torch.tensor(new_ids, device=inputs.device)
        picked = logprobs[len(prompt_ids) - 1 :].gather(1, targets[:, None])
    return float(picked.sum())
