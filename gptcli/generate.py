"""Text generation: the chapter's decoding (greedy, temperature, top-k) plus top-p and beam search,
decoded incrementally with a key/value cache.

One sampling step works on the logits of the last position, in this order:

1. top-k, on the logits (the chapter's rule): logits below the k-th largest become -inf (ties with
   the k-th value stay);
2. temperature: 0 means greedy, the argmax of the logits, and no randomness (top-k and top-p keep the
   argmax, so they change nothing); T > 0 means softmax(logits / T);
3. top-p (nucleus), on those probabilities: keep the most probable tokens until their total reaches
   p (always at least one), renormalise;
4. a multinomial draw, from a `torch.Generator` when given (same seed, same tokens).

Beam search does not sample: it keeps the `beam_width` most likely sequences (summed log-probabilities)
and ranks finished ones by logprob / length ** length_penalty.

While prompt + new tokens fit the context length, the prompt is prefilled once into a KV cache and
each step feeds one token. Past the context length the chapter conditions on the last
`context_length` tokens; positions are absolute, so every cached key changes as the window slides:
each step then runs the whole window again, exactly like the chapter's uncached loop.

The core never prints: `stream` yields token ids, the other functions return them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.logprobs import TokenLogprob
    from gptcli.model import GPT, KVCache

FINISH_LENGTH = "length"
FINISH_EOS = "eos"

DEFAULT_BATCH_SIZE = 16
"""Rows `gptcli sample` decodes together (gptcli.batched): on a CPU, 16 rows cost a few times one
row's step, since a decoding step is bound by reading the weights, which a batch reads once."""


@dataclass(frozen=True)
class DecodeSettings:
    """How to pick new tokens. Defaults are the chapter's: greedy, 50 tokens."""

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    beam_width: int = 1
    length_penalty: float = 1.0
    stop_at_eos: bool = True
    eos_id: int = EOT_ID

    def validate(self) -> None:
        if self.max_new_tokens < 0:  # 0 is allowed here (nothing to do); the command wants >= 1
            raise UsageError(f"--max-new-tokens must not be negative, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.beam_width < 1:
            raise UsageError(f"--beam-width must be at least 1, got {self.beam_width}")
        if not math.isfinite(self.length_penalty):
            raise UsageError(f"--length-penalty must be a finite number, got {self.length_penalty}")
        if self.beam_width > 1 and (self.temperature > 0 or self.top_k is not None or self.top_p is not None):
            raise UsageError(
                "beam search (--beam-width > 1) is deterministic; it does not combine with "
                "--temperature, --top-k or --top-p"
            )

    @property
    def samples(self) -> bool:
        """Whether decoding draws random numbers (so a seed matters)."""
        return self.beam_width == 1 and self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """New tokens (without a final <|endoftext|>) and why generation stopped: `length` or `eos`.

    Beam search also gives the summed log-probability of the new tokens (including the
    <|endoftext|> that ended them) and the length-normalised score it ranked by; batched decoding,
    on request, each new token's log-probabilities (gptcli.logprobs)."""

    token_ids: list[int]
    finish_reason: str
    logprob: float | None = None
    score: float | None = None
    token_logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for (gptcli.batched)


def finish_reason(num_tokens: int, settings: DecodeSettings) -> str:
    """A sampled sequence shorter than `max_new_tokens` can only have stopped at <|endoftext|>."""
    return FINISH_EOS if num_tokens < settings.max_new_tokens else FINISH_LENGTH


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# --- one step ------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The chapter's top-k: logits below the k-th largest of each row become -inf."""
    import torch

    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: the smallest set of most probable tokens whose total reaches `p`, renormalised."""
    import torch

    # A stable sort keeps equal probabilities in index order, as argmax does: a tiny p is greedy.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more probable tokens
    sorted_probs = sorted_probs.masked_fill(before >= p, 0.0)  # the first token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor | None:
    """The distribution each row (rows, vocab) samples from: top-k, temperature, top-p (steps 1-3
    above); None for greedy decoding, which samples nothing."""
    import torch

    if settings.temperature == 0:
        return None
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p is not None and settings.top_p < 1.0:
        probs = top_p_filter(probs, settings.top_p)
    return probs


def next_token(
    logits: torch.Tensor, settings: DecodeSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row (rows, 1) from last-position logits (rows, vocab)."""
    import torch

    probs = sampling_probs(logits, settings)
    if probs is None:
        # Greedy: filtering keeps the argmax, and no random number is drawn (training's samples must
        # not disturb its RNG stream).
        return torch.argmax(logits, dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# --- feeding the model ---------------------------------------------------------------------------


class _Feeder:
    """Next-token logits for growing sequences: KV-cached while they fit the context, then the
    chapter's sliding window (a full forward pass over the last `context_length` tokens)."""

    def __init__(self, model: GPT, prompt_length: int, max_new_tokens: int, use_cache: bool) -> None:
        from gptcli.model import KVCache

        self.model = model
        self.context_length = model.config.context_length
        self.cache: KVCache | None = None
        if use_cache and prompt_length <= self.context_length:
            weight = model.tok_emb.weight
            self.cache = KVCache(
                model.config, batch_size=1,
                max_length=min(self.context_length, prompt_length + max_new_tokens),
                device=weight.device, dtype=weight.dtype,
            )

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """`seqs` (rows, length): the whole sequences so far. Returns float32 logits (rows, vocab)."""
        if self.cache is not None and seqs.shape[1] <= self.cache.max_length:
            out = self.model(seqs[:, self.cache.length :], cache=self.cache, last_only=True)
        else:
            self.cache = None  # the window slides from here on; cached positions are stale
            out = self.model(seqs[:, -self.context_length :], last_only=True)
        return out[:, -1, :].float()

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


def _prompt_tensor(model: GPT, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    import torch

    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise UsageError("the prompt has no tokens")
    return ids.to(model.tok_emb.weight.device)


# --- decoding ------------------------------------------------------------------------------------


def stream(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (greedy or sampling; beam search cannot stream).

    Stops after `max_new_tokens`, or at <|endoftext|> (not yielded) when `stop_at_eos`.
    The model should be in eval mode.
    """
    import torch

    settings = settings or DecodeSettings()
    settings.validate()
    if settings.beam_width > 1:
        raise UsageError("beam search returns whole sequences; it cannot stream")
    ids = _prompt_tensor(model, prompt_ids)
    feeder = _Feeder(model, ids.shape[1], settings.max_new_tokens, use_cache)
    for _ in range(settings.max_new_tokens):
        # inference_mode only around the work, so it is not left on while the caller holds a token.
        with torch.inference_mode():
            chosen = next_token(feeder.logits(ids), settings, generator)
            token = int(chosen.item())
            if settings.stop_at_eos and token == settings.eos_id:
                return
            ids = torch.cat((ids, chosen), dim=1)
        yield token


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


def _normalised(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


def _ranking_score(generation: Generation) -> float:
    """The score a finished beam is ranked by (beam search sets one on every sequence it finishes)."""
    if generation.score is None:
        raise ValueError("a beam-search result without a score")
    return generation.score


def beam_search(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings,
    num_return: int = 1,
    use_cache: bool = True,
) -> list[Generation]:
    """The `num_return` best sequences of a beam search, best first.

    Each step scores every continuation of every live beam, keeps the `beam_width` best that do not
    end in <|endoftext|> as the next beams and sets those that do aside as finished. The search
    stops at `max_new_tokens`, or once `beam_width` sequences have finished and no live beam
    scores better (Hugging Face's default stopping rule).
    """
    import torch

    settings.validate()
    width = settings.beam_width
    if not 1 <= num_return <= width:
        raise UsageError(f"beam search returns at most --beam-width ({width}) sequences, not {num_return}")
    ids = _prompt_tensor(model, prompt_ids)
    prompt_length = ids.shape[1]
    feeder = _Feeder(model, prompt_length, settings.max_new_tokens, use_cache)
    eos = settings.eos_id if settings.stop_at_eos else None
    penalty = settings.length_penalty
    scores = [0.0]  # summed log-probabilities of the live beams
    finished: list[Generation] = []
    reached_length = True
    for step in range(settings.max_new_tokens):
        length = step + 1
        with torch.inference_mode():
            logprobs = torch.log_softmax(feeder.logits(ids), dim=-1)
            vocab = logprobs.shape[-1]
            totals = logprobs + torch.tensor(scores, device=logprobs.device)[:, None]
            # 2 * width candidates always hold `width` that are not <|endoftext|> (one per beam at most).
            top = torch.topk(totals.flatten(), min(2 * width, totals.numel()))
        parents: list[int] = []
        tokens: list[int] = []
        new_scores: list[float] = []
        for total, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            parent, token = divmod(index, vocab)
            if token == eos:
                new = ids[parent, prompt_length:].tolist()
                finished.append(Generation(new, FINISH_EOS, total, _normalised(total, length, penalty)))
                continue
            parents.append(parent)
            tokens.append(token)
            new_scores.append(total)
            if len(parents) == width:
                break
        if not parents:
            reached_length = False
            break
        with torch.inference_mode():
            rows = torch.tensor(parents, device=ids.device)
            if parents != list(range(ids.shape[0])):  # skip the copy when every beam kept its row
                feeder.reorder(rows)
            chosen = torch.tensor(tokens, device=ids.device)[:, None]
            ids = torch.cat((ids.index_select(0, rows), chosen), dim=1)
        scores = new_scores
        if len(finished) >= width:
            kth_best = sorted((_ranking_score(g) for g in finished), reverse=True)[width - 1]
            if _normalised(scores[0], length, penalty) <= kth_best:
                reached_length = False
                break
    if reached_length:
        for row, total in enumerate(scores):
            new = ids[row, prompt_length:].tolist()
            finished.append(Generation(new, FINISH_LENGTH, total, _normalised(total, len(new), penalty)))
    finished.sort(key=_ranking_score, reverse=True)
    return finished[:num_return]


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
    """The new token ids for each row of `prompt` ((batch, length) tensor, or one list of ids)."""
    import torch

    settings = DecodeSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        beam_width=beam_width, length_penalty=length_penalty, stop_at_eos=stop_at_eos, eos_id=eos_id,
    )
    rows = prompt.tolist() if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else [list(prompt)]
    return [decode(model, row, settings, generator, use_cache).token_ids for row in rows]


def sequence_logprob(model: GPT, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> float:
    """Summed log-probability of `new_ids` following `prompt_ids` (all within the context length)."""
    import torch

    ids = list(prompt_ids) + list(new_ids)
    if len(ids) > model.config.context_length + 1:
        raise ValueError("sequence_logprob needs prompt + new tokens within the context length")
    if not new_ids:
        return 0.0
    inputs = _prompt_tensor(model, ids[:-1])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(inputs)[0].float(), dim=-1)
        targets = torch.tensor(new_ids, device=inputs.device)
        picked = logprobs[len(prompt_ids) - 1 :].gather(1, targets[:, None])
    return float(picked.sum())
