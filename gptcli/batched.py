"""Batched decoding: many rows (prompts, samples) decoded together, each giving the tokens it
would give decoded alone (`gptcli.generate.stream`).

Rows sit in the slots of one key/value cache (`RaggedKVCache`). Each row's positions start at 0
whatever its neighbours' lengths: a step feeds every row its last token at the row's own
position, writes its key and value at the row's own length, and masks the cache slots past it.
When all rows have the same length (samples of one prompt, rows admitted together) the step is
the plain cached step: one slice write and no mask.

A new row is admitted by prefilling its prompt without its last token (rows right-padded, plain
causal attention: padding only ever follows the tokens that matter, so no valid query sees it);
the next step then feeds the last prompt token along with everyone else's. A row that finishes
(<|endoftext|> or `max_new_tokens`) hands its slot to the next waiting row, or, when none waits,
the batch shrinks so it stops costing compute (continuous batching). A row that outgrows the
context length leaves the cache and continues with the chapter's sliding window: each step a full
forward pass over its last `context_length` tokens.

The core never prints: `decode_batch` yields `RowEvent`s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gptcli.errors import UsageError
from gptcli.generate import (
    DEFAULT_BATCH_SIZE,
    DecodeSettings,
    Generation,
    finish_reason,
    make_generator,
    sampling_probs,
)
from gptcli.logprobs import MAX_TOP_LOGPROBS, step_logprobs
from gptcli.model import KVCache

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.logprobs import TokenLogprob
    from gptcli.model import GPT

@dataclass
class RowEvent:
    """A new token of row `row` (`token`), or the row's finished generation (`generation`)."""

    row: int
    token: int | None = None
    generation: Generation | None = None


class RaggedKVCache(KVCache):
    """A key/value cache whose rows have their own lengths; each forward pass feeds one token per row.

    `lengths` (batch,) are the filled positions of each row, `length` the longest (what the model
    checks against the context length). `uniform` says every row has the same length."""

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(config, batch_size, max_length, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.uniform = True
        self._rows = torch.arange(batch_size, device=device)
        self._mask: torch.Tensor | None = None

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths
        self._rows = torch.arange(lengths.shape[0], device=lengths.device)
        values = lengths.tolist()
        self.length = max(values, default=0)
        self.uniform = min(values, default=0) == self.length

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if seq_len != 1:
            raise ValueError("a ragged cache takes one token per row per step")
        if not self.uniform:  # slots up to each row's new token are visible; one mask for every layer
            visible = torch.arange(self.length + 1, device=device) <= self.lengths[:, None]
            self._mask = visible[:, None, None, :]
        return self.lengths[:, None]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        end = self.length + 1
        if self.uniform:
            self.keys[layer, :, :, self.length] = k[:, :, 0]
            self.values[layer, :, :, self.length] = v[:, :, 0]
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], None, False
        self.keys[layer, self._rows, :, self.lengths] = k[:, :, 0]
        self.values[layer, self._rows, :, self.lengths] = v[:, :, 0]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], self._mask, False

    def advance(self, seq_len: int) -> None:
        self.lengths = self.lengths + seq_len
        self.length += seq_len

    def fill(self, slots: list[int], prefix: KVCache, lengths: list[int]) -> None:
        """Put the keys and values of `prefix` (a cache of len(slots) rows) into `slots`."""
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        filled = prefix.length
        if filled:
            self.keys[:, index, :, :filled] = prefix.keys[:, :, :, :filled]
            self.values[:, index, :, :filled] = prefix.values[:, :, :, :filled]
        new_lengths = self.lengths.clone()
        new_lengths[index] = torch.tensor(lengths, device=index.device)
        self.set_lengths(new_lengths)

    def keep(self, slots: list[int]) -> None:
        """Keep only `slots`, in this order (the filled positions only are copied)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        filled = self.length
        keys = self.keys.new_empty(self.keys.shape[0], len(slots), *self.keys.shape[2:])
        values = torch.empty_like(keys)
        keys[:, :, :, :filled] = self.keys[:, index, :, :filled]
        values[:, :, :, :filled] = self.values[:, index, :, :filled]
        self.keys, self.values = keys, values
        self.set_lengths(self.lengths.index_select(0, index))


@dataclass
class _Row:
    index: int  # position in the input
    ids: list[int]  # prompt and new tokens so far
    prompt_length: int
    generator: torch.Generator | None
    new: list[int] = field(default_factory=list)
    slot: int | None = None  # its cache slot; None once it decodes with the sliding window
    logprobs: list[TokenLogprob] | None = None  # one per new token, with `decode_batch(logprobs=K)`


class _Batch:
    """The rows being decoded: cached ones (one per cache slot) and windowed ones (past the context)."""

    def __init__(self, model: GPT, settings: DecodeSettings, batch_size: int, max_length: int,
                 logprobs: int | None) -> None:
        weight = model.tok_emb.weight
        self.model = model
        self.settings = settings
        self.logprobs = logprobs
        self.context_length = model.config.context_length
        self.device = weight.device
        self.cache = RaggedKVCache(model.config, batch_size, max_length, weight.device, weight.dtype)
        self.slots: list[_Row | None] = [None] * batch_size
        self.windowed: list[_Row] = []
        self.last = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)

    def admit(self, slots: list[int], rows: list[_Row]) -> None:
        """Put `rows` in `slots`: their prompts but the last token prefilled, that token next to feed."""
        for group in _length_groups(list(zip(slots, rows, strict=True))):
            self._prefill([slot for slot, _ in group], [row for _, row in group])
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.last[index] = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        for slot, row in zip(slots, rows, strict=True):
            self.slots[slot] = row
            row.slot = slot

    def _prefill(self, slots: list[int], rows: list[_Row]) -> None:
        """One forward pass over `rows`' prompts but their last token (right-padded, plain causal)."""
        width = max(len(r.ids) for r in rows) - 1
        prefix = KVCache(self.model.config, len(rows), max(width, 1), device=self.device,
                         dtype=self.cache.keys.dtype)
        if width > 0:
            padded = [r.ids[:-1] + [0] * (width + 1 - len(r.ids)) for r in rows]
            self.model(torch.tensor(padded, device=self.device), cache=prefix, last_only=True)
        self.cache.fill(slots, prefix, [len(r.ids) - 1 for r in rows])

    def compact(self) -> None:
        live = [slot for slot, row in enumerate(self.slots) if row is not None]
        if len(live) < len(self.slots):
            self.cache.keep(live)
            self.last = self.last[live]
            self.slots = [self.slots[slot] for slot in live]
            for slot, row in enumerate(self.slots):
                row.slot = slot  # type: ignore[union-attr]

    def logits(self) -> tuple[list[_Row], torch.Tensor]:
        """Next-token logits (rows, vocab) of every live row, cached rows first."""
        rows = [row for row in self.slots if row is not None]
        parts = []
        if rows:
            parts.append(self.model(self.last, cache=self.cache, last_only=True)[:, -1])
        if self.windowed:
            window = [r.ids[-self.context_length :] for r in self.windowed]
            parts.append(self.model(torch.tensor(window, device=self.device), last_only=True)[:, -1])
            rows = rows + self.windowed
        return rows, torch.cat(parts).float() if len(parts) > 1 else parts[0].float()


PADDING_SHARE = 0.25
"""Prefill groups rows of similar prompt lengths: padding may add at most this share of real tokens."""


def _length_groups(entries: list[tuple[int, _Row]]) -> list[list[tuple[int, _Row]]]:
    """`(slot, row)` entries grouped for prefilling: by prompt length, short first, each group padded
    to its longest prompt with at most PADDING_SHARE more tokens than its prompts hold."""
    groups: list[list[tuple[int, _Row]]] = []
    real = 0
    for entry in sorted(entries, key=lambda e: len(e[1].ids)):
        length = len(entry[1].ids) - 1
        if groups and (len(groups[-1]) + 1) * length <= (1 + PADDING_SHARE) * (real + length):
            groups[-1].append(entry)
            real += length
        else:
            groups.append([entry])
            real = length
    return groups


def _choose(logits: torch.Tensor, probs: torch.Tensor | None, rows: list[_Row]) -> torch.Tensor:
    """Each row's next token (rows, 1), as `generate.next_token` picks it for that row alone, from
    the distributions `generate.sampling_probs` gave (None: greedy)."""
    if probs is None:
        return torch.argmax(logits, dim=-1, keepdim=True)
    # Each row draws from its own generator, as it would alone.
    return torch.cat([
        torch.multinomial(probs[i : i + 1], num_samples=1, generator=row.generator)
        for i, row in enumerate(rows)
    ])


def _check(model: GPT, prompts: Sequence[Sequence[int]], settings: DecodeSettings, batch_size: int,
           logprobs: int | None) -> None:
    settings.validate()
    if settings.beam_width > 1:
        raise UsageError("batched decoding samples or decodes greedily; beam search runs one prompt at a time")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise UsageError(f"--logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
    for number, prompt in enumerate(prompts):
        if not 1 <= len(prompt) <= model.config.context_length:
            raise UsageError(f"prompt {number} has {len(prompt)} tokens; it needs 1 to the context length")


def _row_generator(seeds: Sequence[int | None] | None, row: int, device: torch.device) -> torch.Generator | None:
    """Row `row`'s own sampling generator, or None where it has no seed (the global one then)."""
    seed = None if seeds is None else seeds[row]
    return None if seed is None else make_generator(seed, device)


def decode_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings,
    seeds: Sequence[int | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tokens: bool = False,
    logprobs: int | None = None,
) -> Iterator[RowEvent]:
    """Decode every prompt (greedy or sampled), `batch_size` rows at a time.

    Row i samples with its own generator seeded with `seeds[i]`. Yields a `RowEvent` with the
    generation of each row as it finishes (in finishing order), and with `tokens`, one per new
    token too. Rows start in input order with `tokens`, else shortest prompt first. With
    `logprobs` = K (0 to MAX_TOP_LOGPROBS), each generation carries its tokens' log-probabilities
    and K alternatives per token (gptcli.logprobs). The model should be in eval mode.
    """
    _check(model, prompts, settings, batch_size, logprobs)
    if settings.max_new_tokens == 0 or not prompts:
        for i in range(len(prompts)):
            yield RowEvent(i, generation=Generation([], finish_reason(0, settings),
                                                    token_logprobs=None if logprobs is None else []))
        return
    device = model.tok_emb.weight.device
    waiting = [
        _Row(i, list(p), len(p), _row_generator(seeds, i, device), logprobs=None if logprobs is None else [])
        for i, p in enumerate(prompts)
    ]
    if not tokens:
        # Rows of similar prompt lengths decode together: less padding in the prefill and in the
        # cache every step reads. (Streaming keeps input order, so the first row comes first.)
        waiting.sort(key=lambda row: len(row.ids))
    waiting.reverse()  # pop() takes the next row
    longest = max(len(p) for p in prompts)
    max_length = min(model.config.context_length, longest + settings.max_new_tokens - 1)
    with torch.inference_mode():
        batch = _Batch(model, settings, min(batch_size, len(prompts)), max_length, logprobs)
        batch.admit(list(range(len(batch.slots))), [waiting.pop() for _ in batch.slots])
        while any(row is not None for row in batch.slots) or batch.windowed:
            yield from _step(batch, waiting, tokens)


def _step(batch: _Batch, waiting: list[_Row], tokens: bool) -> Iterator[RowEvent]:
    """One token for every live row; finished rows leave, waiting rows take their slots."""
    settings = batch.settings
    rows, logits = batch.logits()
    probs = sampling_probs(logits, settings)
    chosen = _choose(logits, probs, rows)
    records = None if batch.logprobs is None else step_logprobs(logits, probs, chosen, batch.logprobs)
    # The next input of the cached rows (every slot is live between steps), without going through Python.
    batch.last = chosen[: len(batch.slots)].clone()
    freed: list[int] = []
    still_windowed = []
    for number, (row, token) in enumerate(zip(rows, chosen.view(-1).tolist(), strict=True)):
        done = settings.stop_at_eos and token == settings.eos_id
        if not done:
            row.new.append(token)
            row.ids.append(token)
            if records is not None and row.logprobs is not None:
                row.logprobs.append(records[number])
            if tokens:
                yield RowEvent(row.index, token=token)
            done = len(row.new) >= settings.max_new_tokens
        if done:
            reason = finish_reason(len(row.new), settings)
            yield RowEvent(row.index, generation=Generation(row.new, reason, token_logprobs=row.logprobs))
        if row.slot is None:
            if not done:
                still_windowed.append(row)
        elif done or len(row.ids) > batch.context_length:
            batch.slots[row.slot] = None
            freed.append(row.slot)
            row.slot = None
            if not done:
                still_windowed.append(row)  # past the context: the chapter's sliding window
    batch.windowed = still_windowed
    _refill(batch, waiting, freed)


def _refill(batch: _Batch, waiting: list[_Row], freed: list[int]) -> None:
    if not freed:
        return
    if waiting:
        slots = freed[: len(waiting)]
        batch.admit(slots, [waiting.pop() for _ in slots])
    batch.compact()
