"""How `gptcli sample` prints its rows: text (whole, or streamed token by token) or JSON objects, in
input order, with the --logprobs tables; and the prompts it prints them with."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptcli import jsonio
from gptcli.commands._common import OutputOptions

if TYPE_CHECKING:
    import tiktoken

    from gptcli.sampling import DecodeSettings, Generation


@dataclass
class Prompt:
    """One prompt, as given and as token ids."""

    text: str
    ids: list[int]
    label: str  # for error messages: "the prompt" or "line 3"


@dataclass(frozen=True)
class SampleOutput(OutputOptions):
    """`sample`'s printing: --each-line, --stream, --completion-only and --logprobs K (None: not asked
    for), besides --json and --verbose."""

    each_line: bool = False
    stream: bool = False
    completion_only: bool = False
    logprobs: int | None = None


def _decode(tokenizer: tiktoken.Encoding, ids: list[int]) -> str:
    # A model with a padded vocabulary may emit ids the tokenizer does not know; drop them.
    return tokenizer.decode([i for i in ids if i < tokenizer.n_vocab])


class _RowText:
    """One output row: its prompt, seed, and the text of its tokens as they come (a character split
    across tokens waits for its last byte)."""

    def __init__(self, tokenizer: tiktoken.Encoding, prompt: Prompt, seed: int | None) -> None:
        import codecs

        self.tokenizer = tokenizer
        self.prompt = prompt
        self.seed = seed
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[str] = []  # streamed text not printed yet
        self.generation: Generation | None = None

    def piece(self, token: int) -> str:
        if token >= self.tokenizer.n_vocab:
            return ""
        return self.utf8.decode(self.tokenizer.decode_single_token_bytes(token))

    def tail(self) -> str:
        return self.utf8.decode(b"", final=True)


class Printer:
    """Prints rows in input order as soon as they and every row before them have finished; with
    --stream, the first unfinished row's text token by token (later rows' text waits its turn)."""

    def __init__(self, tokenizer: tiktoken.Encoding, settings: DecodeSettings, model_path: str, precision: str,
                 options: SampleOutput) -> None:
        self.tokenizer, self.settings, self.model_path, self.precision = tokenizer, settings, model_path, precision
        self.options = options
        self.rows: dict[int, _RowText] = {}  # rows added and not printed yet (a printed row is let go)
        self.added = 0
        self.head = 0  # the first row not printed in full
        self.head_started = False  # whether the head row's prompt is printed (--stream)
        self.total_tokens = 0

    def add_row(self, prompt: Prompt, seed: int | None) -> int:
        self.rows[self.added] = _RowText(self.tokenizer, prompt, seed)
        self.added += 1
        return self.added - 1

    def _text(self, text: str) -> str:
        return _one_line(text) if self.options.each_line else text

    def _begin(self, row: _RowText) -> None:
        if not (self.options.each_line or self.options.json or self.head == 0):
            write("\n")  # a blank line between samples
        if self.options.stream:
            write(self._text("" if self.options.completion_only else row.prompt.text) + "".join(row.pending))
            row.pending.clear()
            self.head_started = True

    def token(self, index: int, token: int) -> None:
        row = self.rows[index]
        row.pending.append(self._text(row.piece(token)))
        if index == self.head:
            if not self.head_started:
                self._begin(row)
            write("".join(row.pending))
            row.pending.clear()

    def finished(self, index: int, generation: Generation) -> None:
        self.rows[index].generation = generation
        self.total_tokens += len(generation.token_ids)
        while self.head in self.rows and self.rows[self.head].generation is not None:
            row = self.rows.pop(self.head)
            if not self.head_started:
                self._begin(row)
            if self.options.stream:
                write(self._text("".join(row.pending) + row.tail()) + "\n")
            else:
                self._print_whole(row)
            if self.options.logprobs is not None and not self.options.json:
                self._print_logprobs(row.generation)  # type: ignore[arg-type]
            self.head += 1
            self.head_started = False
        if self.options.stream and self.head in self.rows and self.rows[self.head].pending:
            self._begin(self.rows[self.head])  # the next row's text so far, then it streams live

    def _print_whole(self, row: _RowText) -> None:
        generation = row.generation
        assert generation is not None
        completion = _decode(self.tokenizer, generation.token_ids)
        if self.options.json:
            record: dict[str, Any] = {
                "prompt": row.prompt.text, "completion": completion, "token_ids": generation.token_ids,
                "finish_reason": generation.finish_reason, "model": self.model_path, "dtype": self.precision,
                "seed": row.seed,
                "settings": self.settings.to_dict(),
                **self._logprob_fields(generation),
            }
            write(jsonio.dumps(record, ensure_ascii=False) + "\n")
        else:
            head = "" if self.options.completion_only else row.prompt.text
            write(self._text(head + completion) + "\n")

    def _logprob_fields(self, generation: Generation) -> dict[str, Any]:
        """--json's log-probabilities: a beam's sequence log-probability (always), and with --logprobs
        the OpenAI-style `logprobs` object of a greedy or sampled row."""
        from gptcli.logprobs import openai_logprobs

        if generation.score is not None:  # beam search
            return {"sequence_logprob": generation.logprob, "score": generation.score}
        if self.options.logprobs is None or generation.token_logprobs is None:
            return {}
        return {"logprobs": openai_logprobs(generation.token_logprobs, self._token_text)}

    def _token_text(self, token: int) -> str:
        from gptcli.tokenizer import token_text

        return token_text(self.tokenizer, token)

    def _print_logprobs(self, generation: Generation) -> None:
        """The table of --logprobs after a row's text (beam search: its sequence log-probability)."""
        from gptcli.commands._tables import logprob_table, print_table

        if generation.score is not None:
            write(f"sequence log-probability {generation.logprob:.4f}, score {generation.score:.4f} "
                   f"(log-probability / length ** {self.settings.length_penalty:g})\n")
        elif generation.token_logprobs is not None:
            print_table(logprob_table(generation.token_logprobs, self._token_text, self.options.logprobs or 0))


def _one_line(text: str) -> str:
    """`--each-line` keeps one result per line: newlines become spaces (the chapter's compact print)."""
    return re.sub(r"\r\n|\r|\n", " ", text)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
