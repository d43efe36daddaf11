"""Log-probabilities of generated tokens (`gptcli sample --logprobs K`).

Each decoding step records, for the token it picked: its log-probability under the distribution it
was actually drawn from (after top-k, temperature and top-p: `gptcli.sampling.sampling_probs`), its
log-probability under the model's own distribution (softmax of the raw logits), and the K most
likely tokens of the drawn-from distribution. Greedy decoding draws from nothing, so its numbers
are the model's own distribution. Tokens that top-k or top-p removed have probability 0; they are
never among the K alternatives (there may be fewer than K).

`openai_logprobs` lays a row's records out as OpenAI's completions API does (`tokens`,
`token_logprobs`, `top_logprobs`), plus `raw_token_logprobs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAX_TOP_LOGPROBS = 20
"""The most alternatives `--logprobs` lists per token (OpenAI's completions API allows up to 20 too)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token and what the model thought at that step."""

    token: int
    logprob: float  # under the distribution sampled from
    raw_logprob: float  # under the model's own distribution (temperature 1, no filtering)
    top: tuple[tuple[int, float], ...]  # the K most likely (token, logprob) drawn-from, most likely first


def step_logprobs(
    logits: torch.Tensor, probs: torch.Tensor | None, chosen: torch.Tensor, k: int
) -> list[TokenLogprob]:
    """Records for one step of every row: `logits` (rows, vocab) the model's, `probs` the distribution
    sampled from (None when greedy), `chosen` (rows, 1) the picked tokens, `k` alternatives per row."""
    import torch

    raw = torch.log_softmax(logits.float(), dim=-1)
    drawn = raw if probs is None else torch.log(probs.float())
    picked = drawn.gather(1, chosen).view(-1).tolist()
    picked_raw = raw.gather(1, chosen).view(-1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in picked]
    if k > 0:
        top = torch.topk(drawn, min(k, drawn.shape[-1]), dim=-1)
        for row, (values, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            # Tokens removed by top-k / top-p (probability 0) are not alternatives.
            tops[row] = [(i, v) for i, v in zip(ids, values, strict=True) if math.isfinite(v)]
    return [
        TokenLogprob(int(token), lp, raw_lp, tuple(top))
        for token, lp, raw_lp, top in zip(chosen.view(-1).tolist(), picked, picked_raw, tops, strict=True)
    ]


def openai_logprobs(records: Sequence[TokenLogprob], text_of: Callable[[int], str]) -> dict[str, Any]:
    """The `logprobs` object of OpenAI's completions API for one row: `tokens` (texts),
    `token_logprobs`, `top_logprobs` (a {token text: logprob} dict per token, most likely first),
    and `raw_token_logprobs` (the model's own distribution)."""
    return {
        "tokens": [text_of(r.token) for r in records],
        "token_logprobs": [r.logprob for r in records],
        "top_logprobs": [_by_text(r.top, text_of) for r in records],
        "raw_token_logprobs": [r.raw_logprob for r in records],
    }


def _by_text(top: Sequence[tuple[int, float]], text_of: Callable[[int], str]) -> dict[str, float]:
    by_text: dict[str, float] = {}
    for token, logprob in top:
        by_text.setdefault(text_of(token), logprob)  # texts are unique (see token_text); keep the likelier
    return by_text

