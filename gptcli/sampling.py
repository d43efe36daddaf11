"""How new tokens are picked: the settings every decoder takes (and checks, for the core and for
`gptcli sample` alike), and one sampling step on last-position logits, in this order:

1. top-k, on the logits (the chapter's rule): logits below the k-th largest become -inf (ties with
   the k-th value stay);
2. temperature: 0 means greedy, the argmax of the logits, and no randomness (top-k and top-p keep the
   argmax, so they change nothing); T > 0 means softmax(logits / T);
3. top-p (nucleus), on those probabilities: keep the most probable tokens until their total reaches
   p (always at least one), renormalise;
4. a multinomial draw, from a `torch.Generator` when given (same seed, same tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.logprobs import MAX_TOP_LOGPROBS
from gptcli.tokenizer import EOT_ID

if TYPE_CHECKING:
    import torch

    from gptcli.logprobs import TokenLogprob

FINISH_LENGTH = "length"
FINISH_EOS = "eos"

DEFAULT_BATCH_SIZE = 16
"""Rows `gptcli sample` decodes together (gptcli.batched): on a CPU, 16 rows cost a few times one
row's step, since a decoding step is bound by reading the weights, which a batch reads once."""

MAX_SEED = 2**63 - 1
"""The largest seed a row may use (`--seed` + the sample's number must stay below it)."""


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

    def validate(
        self,
        *,
        min_new_tokens: int = 0,
        num_samples: int = 1,
        seed: int | None = None,
        logprobs: int | None = None,
        batch_size: int = 1,
    ) -> None:
        """Refuse settings no decoder can run, with the option's name (exit 2). The keywords are what
        else a decode was given, checked here so that the core and `gptcli sample` agree: the fewest
        new tokens allowed (the command wants at least 1; 0 is nothing to do for the core), samples
        per prompt and the seed of the first (sample i uses seed + i), `--logprobs` K, rows per batch."""
        self._check_sampling()
        if self.max_new_tokens < min_new_tokens:
            raise UsageError(f"--max-new-tokens must be at least {min_new_tokens}, got {self.max_new_tokens}")
        if num_samples < 1:
            raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
        if seed is not None and not 0 <= seed <= MAX_SEED - num_samples:
            raise UsageError(f"--seed must be between 0 and {MAX_SEED - num_samples}, got {seed}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"--logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")

    def _check_sampling(self) -> None:
        if self.max_new_tokens < 0:
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
    <|endoftext|> that ended them) and the length-normalised score it ranked by; greedy or sampled
    decoding, on request, each new token's log-probabilities (gptcli.logprobs)."""

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
    scaled = logits / settings.temperature
    # A tiny temperature (e.g. 1e-45) makes logits / T overflow: +inf, or -inf for every logit of a
    # row, and softmax then gives NaN. The limit of softmax(logits / T) as T -> 0 is the argmax, so a
    # row whose largest scaled logit is not finite samples its argmax, as greedy decoding would (the
    # engine refuses non-finite logits before this, so the overflow is the temperature's). Rows that
    # do not overflow keep the plain softmax, bit for bit.
    overflow = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))
    probs = torch.softmax(scaled, dim=-1)
    if bool(overflow.any()):
        greedy = torch.zeros_like(probs).scatter(-1, torch.argmax(logits, dim=-1, keepdim=True), 1.0)
        probs = torch.where(overflow, greedy, probs)
    if settings.top_p is not None and settings.top_p < 1.0:
        probs = top_p_filter(probs, settings.top_p)
    return probs


def next_tokens(
    logits: torch.Tensor, probs: torch.Tensor | None, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Each row's next token (rows, 1) from its logits (rows, vocab) and the distributions
    `sampling_probs` gave (None: greedy). Row i draws from `generators[i]` (None: torch's global
    generator), so it draws what it would draw decoded alone."""
    import torch

    if probs is None:
        # Greedy: filtering keeps the argmax, and no random number is drawn (training's samples must
        # not disturb its RNG stream).
        return torch.argmax(logits, dim=-1, keepdim=True)
    return torch.cat([
        torch.multinomial(probs[i : i + 1], num_samples=1, generator=generator)
        for i, generator in enumerate(generators)
    ])

