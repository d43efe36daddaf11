"""Beam search: deterministic decoding that keeps the `beam_width` most likely sequences (summed
log-probabilities) and ranks finished ones by logprob / length ** length_penalty.

The beams are the rows of the decoding engine's batch (gptcli.batched.Batch): its cached steps,
its sliding window past the context and its prepacked weights. This module keeps the search's
own loop: score every continuation, keep the best, follow their parents' rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gptcli.errors import UsageError
from gptcli.sampling import FINISH_EOS, FINISH_LENGTH, DecodeSettings, Generation

if TYPE_CHECKING:
    import torch

    from gptcli.batched import Row
    from gptcli.model import GPT


def _normalised(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


def _ranking_score(generation: Generation) -> float:
    """The score a finished beam is ranked by (beam search sets one on every sequence it finishes)."""
    if generation.score is None:
        raise ValueError("a beam-search result without a score")
    return generation.score


class _Search:
    """The live beams' summed log-probabilities and the sequences finished so far."""

    def __init__(self, settings: DecodeSettings) -> None:
        self.width = settings.beam_width
        self.eos = settings.eos_id if settings.stop_at_eos else None
        self.penalty = settings.length_penalty
        self.scores = [0.0]  # of the live beams, in row order
        self.finished: list[Generation] = []

    def choose(self, rows: list[Row], logits: torch.Tensor, length: int) -> tuple[list[int], list[int]]:
        """The next beams, as (parent rows, tokens): the `width` best continuations of every live
        beam that do not end in <|endoftext|>; those that do are set aside as finished."""
        import torch

        logprobs = torch.log_softmax(logits, dim=-1)
        vocab = logprobs.shape[-1]
        totals = logprobs + torch.tensor(self.scores, device=logprobs.device)[:, None]
        # 2 * width candidates always hold `width` that are not <|endoftext|> (one per beam at most).
        top = torch.topk(totals.flatten(), min(2 * self.width, totals.numel()))
        parents: list[int] = []
        tokens: list[int] = []
        scores: list[float] = []
        for total, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            parent, token = divmod(index, vocab)
            if token == self.eos:
                new = rows[parent].ids[rows[parent].prompt_length :]
                self.finished.append(Generation(new, FINISH_EOS, total, _normalised(total, length, self.penalty)))
                continue
            parents.append(parent)
            tokens.append(token)
            scores.append(total)
            if len(parents) == self.width:
                break
        self.scores = scores
        return parents, tokens

    def settled(self, length: int) -> bool:
        """Whether `width` sequences have finished and no live beam scores better (Hugging Face's
        default stopping rule)."""
        if len(self.finished) < self.width:
            return False
        kth_best = sorted((_ranking_score(g) for g in self.finished), reverse=True)[self.width - 1]
        return _normalised(self.scores[0], length, self.penalty) <= kth_best

    def best(self, reached_length: list[Row] | None, num_return: int) -> list[Generation]:
        """The `num_return` best sequences, with `reached_length` among them: the live beams when the
        search ran to `max_new_tokens`, None when it stopped before."""
        if reached_length is not None:
            for row, total in zip(reached_length, self.scores, strict=True):
                new = row.ids[row.prompt_length :]
                self.finished.append(Generation(new, FINISH_LENGTH, total, _normalised(total, len(new), self.penalty)))
        self.finished.sort(key=_ranking_score, reverse=True)
        return self.finished[:num_return]


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

    from gptcli.batched import Row, prompt_list, start
    from gptcli.kernels.decoding import PackedWeights

    settings.validate()
    width = settings.beam_width
    if not 1 <= num_return <= width:
        raise UsageError(f"beam search returns at most --beam-width ({width}) sequences, not {num_return}")
    prompt = prompt_list(prompt_ids)
    search = _Search(settings)
    if settings.max_new_tokens == 0:
        return search.best([Row(0, prompt, len(prompt))], num_return)
    reached_length: list[Row] | None = None  # stays None when the search stops before max_new_tokens
    with PackedWeights(), torch.inference_mode():
        batch, _ = start(model, [Row(0, prompt, len(prompt))], settings.max_new_tokens, use_cache=use_cache)
        for length in range(1, settings.max_new_tokens + 1):
            rows, logits = batch.logits()
            parents, tokens = search.choose(rows, logits, length)
            if not parents:
                break
            batch.follow(parents, tokens)
            if search.settled(length):
                break
        else:
            reached_length = batch.rows()
    return search.best(reached_length, num_return)
