"""The decoding engine: rows (prompts, samples, beams) decoded together, each giving the tokens it
would give decoded alone. Decoding one row is a batch of one (`gptcli.generate.stream`, `sample`,
`generate`: training's epoch sample); beam search (gptcli.beam) runs its own loop over a `Batch`.

Rows sit in the slots of one key/value cache (`RaggedKVCache`). Each row's positions start at 0
whatever its neighbours' lengths: a step feeds every row its last token at the row's own
position, writes its key and value at the row's own length, and masks the cache slots past it.
When all rows have the same length (samples of one prompt, rows admitted together, beams) the step
is the plain cached step: one slice write and no mask.

A new row is admitted by prefilling its prompt without its last token (rows right-padded, plain
causal attention: padding only ever follows the tokens that matter, so no valid query sees it);
the next step then feeds the last prompt token along with everyone else's. A row that finishes
(<|endoftext|> or `max_new_tokens`) hands its slot to the next waiting row, or, when none waits,
the batch shrinks so it stops costing compute (continuous batching). A row that outgrows the
context length leaves the cache and continues with the chapter's sliding window: each step a full
forward pass over its last `context_length` tokens (positions are absolute, so every cached key
would change as the window slides). A row that cannot use the cache at all (`use_cache=False`, or
a prompt longer than the context) decodes with the sliding window from its first step.

Each decode holds its own prepacked weights (gptcli.kernels.decoding.PackedWeights), active, as is
inference mode, only around its steps: not while the caller holds a token.

The core never prints: `decode_rows` and `decode_batch` yield `RowEvent`s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gptcli.errors import GptcliError, UsageError
from gptcli.kernels.decoding import PackedWeights
from gptcli.logprobs import step_logprobs
from gptcli.model import KVCache
from gptcli.sampling import (
    DEFAULT_BATCH_SIZE,
    DecodeSettings,
    Generation,
    finish_reason,
    make_generator,
    next_tokens,
    sampling_probs,
)

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
        """Keep only `slots`, in this order, a slot possibly more than once (the filled positions
        only are copied)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        filled = self.length
        # Zeros, not uninitialised memory: steps read the slots past a row's length (masked, weight
        # 0), and 0 * NaN garbage would be NaN.
        keys = self.keys.new_zeros(self.keys.shape[0], len(slots), *self.keys.shape[2:])
        values = torch.zeros_like(keys)
        keys[:, :, :, :filled] = self.keys[:, index, :, :filled]
        values[:, :, :, :filled] = self.values[:, index, :, :filled]
        self.keys, self.values = keys, values
        self.set_lengths(self.lengths.index_select(0, index))


@dataclass
class Row:
    """One sequence being decoded."""

    index: int  # position in the input
    ids: list[int]  # prompt and new tokens so far
    prompt_length: int
    generator: torch.Generator | None = None  # None: torch's global generator (or greedy)
    new: list[int] = field(default_factory=list)
    slot: int | None = None  # its cache slot; None while it decodes with the sliding window
    logprobs: list[TokenLogprob] | None = None  # one per new token, with `decode_batch(logprobs=K)`


class Batch:
    """The rows being decoded: cached ones (one per cache slot) and windowed ones (past the context,
    or never cached), and the next-token logits of all of them."""

    def __init__(self, model: GPT, slots: int, max_length: int) -> None:
        weight = model.tok_emb.weight
        self.model = model
        self.context_length = model.config.context_length
        self.device = weight.device
        self.cache = RaggedKVCache(model.config, slots, max_length, weight.device, weight.dtype)
        self.slots: list[Row | None] = [None] * slots
        self.windowed: list[Row] = []
        self.last = torch.zeros(slots, 1, dtype=torch.long, device=weight.device)

    def rows(self) -> list[Row]:
        """Every live row, cached ones first (the order of `logits`)."""
        return [row for row in self.slots if row is not None] + self.windowed

    def admit(self, slots: list[int], rows: list[Row]) -> None:
        """Put `rows` in `slots`: their prompts but the last token prefilled, that token next to feed."""
        if not rows:
            return
        for group in _length_groups(list(zip(slots, rows, strict=True))):
            self._prefill([slot for slot, _ in group], [row for _, row in group])
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.last[index] = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        for slot, row in zip(slots, rows, strict=True):
            self.slots[slot] = row
            row.slot = slot

    def _prefill(self, slots: list[int], rows: list[Row]) -> None:
        """One forward pass over `rows`' prompts but their last token (right-padded, plain causal)."""
        width = max(len(r.ids) for r in rows) - 1
        prefix = KVCache(self.model.config, len(rows), max(width, 1), device=self.device,
                         dtype=self.cache.keys.dtype)
        if width > 0:
            padded = [r.ids[:-1] + [0] * (width + 1 - len(r.ids)) for r in rows]
            self.model(torch.tensor(padded, device=self.device), cache=prefix, last_only=True)
        self.cache.fill(slots, prefix, [len(r.ids) - 1 for r in rows])

    def logits(self) -> tuple[list[Row], torch.Tensor]:
        """Next-token logits (rows, vocab), float32, of every live row, cached rows first."""
        rows = [row for row in self.slots if row is not None]
        parts = []
        if rows:
            parts.append(self.model(self.last, cache=self.cache, last_only=True)[:, -1])
        if self.windowed:
            window = [r.ids[-self.context_length :] for r in self.windowed]
            parts.append(self.model(torch.tensor(window, device=self.device), last_only=True)[:, -1])
            rows = rows + self.windowed
        logits = torch.cat(parts).float() if len(parts) > 1 else parts[0].float()
        check_finite(logits)
        return rows, logits

    def settle(self, rows: list[Row], done: list[bool]) -> list[int]:
        """After a step that gave each of `rows` (`logits`' order) a token: finished rows leave, rows
        past the context leave the cache for the sliding window. Returns the slots they freed."""
        freed: list[int] = []
        windowed = []
        for row, finished in zip(rows, done, strict=True):
            if row.slot is not None:
                if not finished and len(row.ids) <= self.context_length:
                    continue
                self.slots[row.slot] = None
                freed.append(row.slot)
                row.slot = None
            if not finished:
                windowed.append(row)  # past the context: the chapter's sliding window
        self.windowed = windowed
        return freed

    def refill(self, waiting: list[Row], freed: list[int]) -> None:
        """Waiting rows take the `freed` slots; the slots nobody takes are dropped."""
        if not freed:
            return
        if waiting:
            slots = freed[: len(waiting)]
            self.admit(slots, [waiting.pop() for _ in slots])
        live = [slot for slot, row in enumerate(self.slots) if row is not None]
        if len(live) < len(self.slots):
            self.cache.keep(live)
            self.last = self.last[live]
            self.slots = [self.slots[slot] for slot in live]
            for slot, row in enumerate(self.slots):
                row.slot = slot  # type: ignore[union-attr]

    def follow(self, parents: list[int], tokens: list[int]) -> None:
        """Beam search's step: the live rows become the rows `parents` (indices into `rows()`, a
        parent possibly more than once), each extended by its token of `tokens`."""
        rows = self.rows()
        children = [
            Row(child, rows[parent].ids + [token], rows[parent].prompt_length)
            for child, (parent, token) in enumerate(zip(parents, tokens, strict=True))
        ]
        cached = len(rows) - len(self.windowed)  # beams all have the same length: all cached or none
        if cached and parents != list(range(cached)):  # skip the copy when every beam kept its row
            self.cache.keep(parents)
        self.last = torch.tensor(tokens, device=self.device)[:, None]
        self.slots = list(children) if cached else []
        self.windowed = [] if cached else children
        for slot, row in enumerate(self.slots):
            row.slot = slot  # type: ignore[union-attr]
        self.settle(children, [False] * len(children))
        if self.windowed:
            self.slots = []  # every beam left together


def check_finite(logits: torch.Tensor) -> None:
    """Refuse a step whose logits hold NaN or inf (NaN weights, or an overflow in a low precision):
    sampling would fail deep in torch, and greedy or beam search would pick garbage. One reduction
    per step, in the one place every decoder (sampling, greedy, beams) takes its logits from: a sum
    (a NaN or an inf anywhere makes it non-finite), a single pass where `isfinite(...).all()` made four."""
    if not math.isfinite(float(logits.sum(dtype=torch.float32))):
        raise GptcliError(
            "the model produced non-finite logits (NaN/inf): its weights may hold NaN or inf, or its "
            "activations overflow at this precision; check the model file, or run it at --dtype fp32"
        )


PADDING_SHARE = 0.25
"""Prefill groups rows of similar prompt lengths: padding may add at most this share of real tokens."""


def _length_groups(entries: list[tuple[int, Row]]) -> list[list[tuple[int, Row]]]:
    """`(slot, row)` entries grouped for prefilling: by prompt length, short first, each group padded
    to its longest prompt with at most PADDING_SHARE more tokens than its prompts hold."""
    groups: list[list[tuple[int, Row]]] = []
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


def start(model: GPT, rows: list[Row], max_new_tokens: int, batch_size: int = 1, use_cache: bool = True,
          input_order: bool = True) -> tuple[Batch, list[Row]]:
    """A batch decoding the first `batch_size` rows that can use the cache, and every row that
    cannot (windowed); the rest wait, as a stack whose pop() is the next row. Rows start in input
    order, or with `input_order=False` shortest prompt first: rows of similar prompt lengths then
    decode together, with less padding in the prefill and in the cache every step reads."""
    context_length = model.config.context_length
    fits = [use_cache and len(row.ids) <= context_length for row in rows]
    waiting = [row for row, cached in zip(rows, fits, strict=True) if cached]
    if not input_order:
        waiting.sort(key=lambda row: len(row.ids))
    waiting.reverse()  # pop() takes the next row
    longest = max((len(row.ids) for row in waiting), default=1)
    batch = Batch(model, min(batch_size, len(waiting)), min(context_length, longest + max_new_tokens - 1))
    batch.windowed = [row for row, cached in zip(rows, fits, strict=True) if not cached]
    batch.admit(list(range(len(batch.slots))), [waiting.pop() for _ in batch.slots])
    return batch, waiting


def prompt_list(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """A prompt (ids, or a tensor of them) as a list; a usage error when it has no tokens."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()
    if not ids:
        raise UsageError("the prompt has no tokens")
    return ids


# --- greedy and sampled decoding ---------------------------------------------------------------------


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
    settings.validate(batch_size=batch_size, logprobs=logprobs)
    if settings.beam_width > 1:
        raise UsageError("batched decoding samples or decodes greedily; beam search runs one prompt at a time")
    for number, prompt in enumerate(prompts):
        if not 1 <= len(prompt) <= model.config.context_length:
            raise UsageError(f"prompt {number} has {len(prompt)} tokens; it needs 1 to the context length")
    device = model.tok_emb.weight.device
    row_seeds: Sequence[int | None] = [None] * len(prompts) if seeds is None else seeds
    rows = [Row(i, list(p), len(p), _generator(row_seeds[i], device)) for i, p in enumerate(prompts)]
    # Streaming keeps input order, so the first row comes first.
    yield from decode_rows(model, rows, settings, batch_size, tokens, logprobs, input_order=tokens)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A row's own sampling generator, or None where it has no seed (torch's global one then)."""
    return None if seed is None else make_generator(seed, device)


def decode_rows(
    model: GPT,
    rows: list[Row],
    settings: DecodeSettings,
    batch_size: int = 1,
    tokens: bool = False,
    logprobs: int | None = None,
    use_cache: bool = True,
    input_order: bool = True,
) -> Iterator[RowEvent]:
    """The engine's loop (greedy or sampled; `settings` already checked): every row of `rows` decoded,
    `batch_size` cached rows at a time (see `start`), as `decode_batch` describes."""
    for row in rows:
        row.logprobs = None if logprobs is None else []
    if settings.max_new_tokens == 0 or not rows:
        for row in rows:
            yield RowEvent(row.index, generation=Generation([], finish_reason(0, settings),
                                                            token_logprobs=row.logprobs))
        return
    packs = PackedWeights()
    with packs, torch.inference_mode():
        batch, waiting = start(model, rows, settings.max_new_tokens, batch_size, use_cache, input_order)
    while batch.slots or batch.windowed:  # every slot is live between steps
        with packs, torch.inference_mode():
            events, freed = _step(batch, settings, tokens, logprobs)
        yield from events
        with packs, torch.inference_mode():
            batch.refill(waiting, freed)


def _step(batch: Batch, settings: DecodeSettings, tokens: bool, logprobs: int | None
          ) -> tuple[list[RowEvent], list[int]]:
    """One token for every live row: the events it makes, and the slots of the rows that left the cache."""
    rows, logits = batch.logits()
    probs = sampling_probs(logits, settings)
    chosen = next_tokens(logits, probs, [row.generator for row in rows])
    records = None if logprobs is None else step_logprobs(logits, probs, chosen, logprobs)
    # The next input of the cached rows (every slot is live between steps), without going through Python.
    batch.last = chosen[: len(batch.slots)].clone()
    events = []
    done = []
    for number, (row, token) in enumerate(zip(rows, chosen.view(-1).tolist(), strict=True)):
        finished = settings.stop_at_eos and token == settings.eos_id
        if not finished:
            row.new.append(token)
            row.ids.append(token)
            if records is not None and row.logprobs is not None:
                row.logprobs.append(records[number])
            if tokens:
                events.append(RowEvent(row.index, token=token))
            finished = len(row.new) >= settings.max_new_tokens
        if finished:
            reason = finish_reason(len(row.new), settings)
            events.append(RowEvent(row.index, generation=Generation(row.new, reason, token_logprobs=row.logprobs)))
        done.append(finished)
    return events, batch.settle(rows, done)
