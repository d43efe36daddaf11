"""Generate text from a trained or converted model: greedy, temperature, top-k, top-p or beam search."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from gptcli import jsonio
from gptcli.commands._common import (
    RUNTIME_PANEL,
    device_option,
    dtype_option,
    load_for_inference,
    read_stdin,
    stdin_is_piped,
    strict_precision_option,
    threads_option,
)
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError
from gptcli.generate import DEFAULT_BATCH_SIZE
from gptcli.logprobs import MAX_TOP_LOGPROBS
from gptcli.settings import DEFAULT_PROMPT, Device, InferenceDtype

if TYPE_CHECKING:
    import tiktoken

    from gptcli.generate import DecodeSettings, Generation
    from gptcli.model import GPT

MAX_SEED = 2**63 - 1
MAX_LENGTH_PENALTY = 10.0  # length ** penalty must stay a finite, non-zero float for any length
DECODING = "Decoding"
OUTPUT = "Input and output"
RUNTIME = RUNTIME_PANEL


@dataclass
class Prompt:
    text: str
    ids: list[int]
    label: str  # for error messages: "the prompt" or "line 3"


# --- prompts and output --------------------------------------------------------------------------


def _strip_newline(text: str) -> str:
    """`echo prompt |` ends the text with a newline that is not part of the prompt."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _prompt_texts(prompt: str | None, each_line: bool) -> list[str]:
    if prompt == "-" or (prompt is None and stdin_is_piped()):
        text = read_stdin()
        if prompt is None and text == "":
            return [DEFAULT_PROMPT]  # e.g. run from a script with an empty stdin
        return text.splitlines() if each_line else [_strip_newline(text)]
    if prompt is None:
        return [DEFAULT_PROMPT]
    return prompt.splitlines() if each_line else [prompt]


def _tokenize_prompts(
    texts: list[str], tokenizer: tiktoken.Encoding, model: GPT, each_line: bool
) -> list[Prompt]:
    from gptcli.tokenizer import EOT_ID, encode

    config = model.config
    prompts = []
    for number, text in enumerate(texts, start=1):
        label = f"line {number}" if each_line else "the prompt"
        # An empty prompt samples unconditionally, starting from <|endoftext|> as GPT-2 does.
        ids = encode(tokenizer, text) or [EOT_ID]
        if len(ids) > config.context_length:
            raise UsageError(
                f"{label} is {len(ids)} tokens, more than the model's context length "
                f"({config.context_length}); shorten it"
            )
        if max(ids) >= config.vocab_size:
            raise UsageError(f"{label} has token ids beyond the model's vocabulary of {config.vocab_size}")
        prompts.append(Prompt(text, ids, label))
    return prompts


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


class _Output:
    """Prints rows in input order as soon as they and every row before them have finished; with
    --stream, the first unfinished row's text token by token (later rows' text waits its turn)."""

    def __init__(self, tokenizer: tiktoken.Encoding, settings: DecodeSettings, model_path: str, precision: str,
                 each_line: bool, stream: bool, completion_only: bool, json_output: bool,
                 logprobs: int | None = None) -> None:
        self.tokenizer, self.settings, self.model_path, self.precision = tokenizer, settings, model_path, precision
        self.each_line, self.stream, self.completion_only, self.json_output = (
            each_line, stream, completion_only, json_output)
        self.logprobs = logprobs  # --logprobs K: per-token log-probabilities (None: not asked for)
        self.rows: list[_RowText] = []
        self.head = 0  # the first row not printed in full
        self.head_started = False  # whether the head row's prompt is printed (--stream)
        self.total_tokens = 0

    def add_row(self, prompt: Prompt, seed: int | None) -> int:
        self.rows.append(_RowText(self.tokenizer, prompt, seed))
        return len(self.rows) - 1

    def _text(self, text: str) -> str:
        return _one_line(text) if self.each_line else text

    def _begin(self, row: _RowText) -> None:
        if not (self.each_line or self.json_output or self.head == 0):
            _write("\n")  # a blank line between samples
        if self.stream:
            _write(self._text("" if self.completion_only else row.prompt.text) + "".join(row.pending))
            row.pending.clear()
            self.head_started = True

    def token(self, index: int, token: int) -> None:
        row = self.rows[index]
        row.pending.append(self._text(row.piece(token)))
        if index == self.head:
            if not self.head_started:
                self._begin(row)
            _write("".join(row.pending))
            row.pending.clear()

    def finished(self, index: int, generation: Generation) -> None:
        self.rows[index].generation = generation
        self.total_tokens += len(generation.token_ids)
        while self.head < len(self.rows) and self.rows[self.head].generation is not None:
            row = self.rows[self.head]
            if not self.head_started:
                self._begin(row)
            if self.stream:
                _write(self._text("".join(row.pending) + row.tail()) + "\n")
            else:
                self._print_whole(row)
            if self.logprobs is not None and not self.json_output:
                self._print_logprobs(row.generation)  # type: ignore[arg-type]
            self.head += 1
            self.head_started = False
        if self.stream and self.head < len(self.rows) and self.rows[self.head].pending:
            self._begin(self.rows[self.head])  # the next row's text so far, then it streams live

    def _print_whole(self, row: _RowText) -> None:
        generation = row.generation
        assert generation is not None
        completion = _decode(self.tokenizer, generation.token_ids)
        if self.json_output:
            record: dict[str, Any] = {
                "prompt": row.prompt.text, "completion": completion, "token_ids": generation.token_ids,
                "finish_reason": generation.finish_reason, "model": self.model_path, "dtype": self.precision,
                "seed": row.seed,
                "settings": self.settings.to_dict(),
                **self._logprob_fields(generation),
            }
            _write(jsonio.dumps(record, ensure_ascii=False) + "\n")
        else:
            head = "" if self.completion_only else row.prompt.text
            _write(self._text(head + completion) + "\n")


    def _logprob_fields(self, generation: Generation) -> dict[str, Any]:
        """--json's log-probabilities: a beam's sequence log-probability (always), and with --logprobs
        the OpenAI-style `logprobs` object of a greedy or sampled row."""
        from gptcli.logprobs import openai_logprobs

        if generation.score is not None:  # beam search
            return {"sequence_logprob": generation.logprob, "score": generation.score}
        if self.logprobs is None or generation.token_logprobs is None:
            return {}
        return {"logprobs": openai_logprobs(generation.token_logprobs, self._token_text)}

    def _token_text(self, token: int) -> str:
        from gptcli.tokenizer import token_text

        return token_text(self.tokenizer, token)

    def _print_logprobs(self, generation: Generation) -> None:
        """The table of --logprobs after a row's text (beam search: its sequence log-probability)."""
        from gptcli.commands._tables import logprob_table, print_table

        if generation.score is not None:
            _write(f"sequence log-probability {generation.logprob:.4f}, score {generation.score:.4f} "
                   f"(log-probability / length ** {self.settings.length_penalty:g})\n")
        elif generation.token_logprobs is not None:
            print_table(logprob_table(generation.token_logprobs, self._token_text, self.logprobs or 0))


def _one_line(text: str) -> str:
    """`--each-line` keeps one result per line: newlines become spaces (the chapter's compact print)."""
    return re.sub(r"\r\n|\r|\n", " ", text)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _decode_rows(
    model: GPT, rows: list[tuple[Prompt, int | None]], settings: DecodeSettings, batch_size: int, out: _Output,
    log: Callable[[str, int, float], None],
) -> None:
    """Every (prompt, seed) row decoded in batches (gptcli.batched), printed through `out`."""
    from gptcli.batched import decode_batch

    started = time.perf_counter()
    for prompt, seed in rows:
        out.add_row(prompt, seed)
    events = decode_batch(model, [p.ids for p, _ in rows], settings, [s for _, s in rows], batch_size,
                          tokens=out.stream, logprobs=out.logprobs)
    for event in events:
        if event.generation is None:
            out.token(event.row, event.token)  # type: ignore[arg-type]
            continue
        out.finished(event.row, event.generation)
        label = rows[event.row][0].label
        log(f"row {event.row + 1} ({label})", len(event.generation.token_ids), time.perf_counter() - started)


# --- the command ---------------------------------------------------------------------------------


def command(
    prompt: str | None = typer.Argument(
        None, show_default=False,
        help=f"Prompt text; '-' reads it from stdin, as does piping text in. Default: '{DEFAULT_PROMPT}'. "
        "An empty prompt samples unconditionally (from <|endoftext|>).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", show_default=False, rich_help_panel=RUNTIME,
        help="Run directory or .safetensors file (a trained run or `gptcli convert` output) "
        "Default: runs/latest.",
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", "-t", rich_help_panel=DECODING,
        help="0 = greedy (argmax, the chapter's default); > 0 samples from softmax(logits / T).",
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", show_default=False, rich_help_panel=DECODING,
        help="Keep the k highest logits before the temperature (the chapter's rule).",
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", show_default=False, rich_help_panel=DECODING,
        help="Nucleus sampling, after top-k and temperature: sample from the smallest set of tokens whose "
        "probability reaches p (0 < p <= 1).",
    ),
    beam_width: int = typer.Option(
        1, "--beam-width", rich_help_panel=DECODING,
        help="Beam search with this many beams (deterministic; > 1 excludes sampling options).",
    ),
    length_penalty: float = typer.Option(
        1.0, "--length-penalty", rich_help_panel=DECODING,
        help="Beam search ranks sequences by log-probability / length ** penalty (0: raw sum, favours "
        f"short ones); between -{MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g}.",
    ),
    stop_at_eos: bool = typer.Option(
        True, "--stop-at-eos/--no-stop-at-eos", rich_help_panel=DECODING,
        help="Stop at <|endoftext|>.",
    ),
    max_new_tokens: int = typer.Option(
        50, "--max-new-tokens", "-n", rich_help_panel=DECODING, help="Most tokens to generate per sample.",
    ),
    num_samples: int = typer.Option(
        1, "--num-samples", rich_help_panel=DECODING,
        help="Samples per prompt (beam search: the best N beams, N <= --beam-width).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", show_default=False, rich_help_panel=DECODING,
        help="Seed for sampling; sample i uses seed + i, so the same seed gives the same text "
        "Default: a random seed, shown by --json and --verbose.",
    ),
    each_line: bool = typer.Option(
        False, "--each-line", rich_help_panel=OUTPUT,
        help="One prompt per input line, one result per output line (newlines in results become spaces).",
    ),
    stream: bool = typer.Option(
        False, "--stream", rich_help_panel=OUTPUT,
        help="Print tokens as they come (the first unfinished row's; rows still print in input order).",
    ),
    completion_only: bool = typer.Option(
        False, "--completion-only", rich_help_panel=OUTPUT, help="Print only the new text, not the prompt.",
    ),
    json_output: bool = typer.Option(
        False, "--json", rich_help_panel=OUTPUT,
        help="One JSON object per sample per line: prompt, completion, token_ids, finish_reason, model, "
        "dtype (the precision that ran), seed, settings; beam search adds sequence_logprob and score, "
        "--logprobs adds logprobs.",
    ),
    logprobs: int | None = typer.Option(
        None, "--logprobs", show_default=False, rich_help_panel=OUTPUT,
        help=f"Each new token's log-probability and the K most likely alternatives at its step (K = 0 to "
        f"{MAX_TOP_LOGPROBS}), from the distribution actually sampled from (after top-k, temperature and top-p; "
        "greedy decoding: the model's own), plus the token's log-probability under the model's own "
        "distribution. With --json, a `logprobs` object as OpenAI's completions API gives it (tokens, "
        "token_logprobs, top_logprobs, plus raw_token_logprobs); without, a table after each text. Beam "
        "search reports the sequence log-probability instead.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", rich_help_panel=OUTPUT, help="Timing and tokens/s per sample on stderr.",
    ),
    device: Device = device_option(),
    dtype: InferenceDtype = dtype_option(),
    strict_precision: bool = strict_precision_option(),
    threads: int | None = threads_option(),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", rich_help_panel=RUNTIME,
        help="Rows (every prompt or line x --num-samples) decoded together; each row gives the same tokens "
        "as alone, and a finished row's slot goes to the next one. Beam search decodes one prompt at a time.",
    ),
) -> None:
    from gptcli.generate import DecodeSettings
    from gptcli.runtime import set_threads

    settings = DecodeSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        beam_width=beam_width, length_penalty=length_penalty, stop_at_eos=stop_at_eos,
    )
    settings.validate()
    _check_options(settings, num_samples, seed, stream, json_output)
    _check_logprobs(logprobs, each_line, json_output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    set_threads(threads)
    try:
        _run(prompt, model, settings, num_samples, seed, each_line, stream, completion_only, json_output,
             verbose, device, dtype, batch_size, strict_precision, logprobs)
    except KeyboardInterrupt:
        if stream:
            _write("\n")
        raise GptcliError("interrupted", EXIT_INTERRUPTED) from None


def _check_logprobs(logprobs: int | None, each_line: bool, json_output: bool) -> None:
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise UsageError(f"--logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}")
    if logprobs is not None and each_line and not json_output:
        raise UsageError("--logprobs prints a table after each text, which --each-line's one result per line "
                         "cannot hold; add --json")


def _check_options(
    settings: DecodeSettings, num_samples: int, seed: int | None, stream: bool, json_output: bool
) -> None:
    from gptcli.ui import console

    if settings.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {settings.max_new_tokens}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    if abs(settings.length_penalty) > MAX_LENGTH_PENALTY:
        raise UsageError(
            f"--length-penalty must be between -{MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g}, "
            f"got {settings.length_penalty:g}"
        )
    if settings.beam_width > 1 and num_samples > settings.beam_width:
        raise UsageError(
            f"beam search returns at most --beam-width ({settings.beam_width}) sequences; "
            f"--num-samples is {num_samples}"
        )
    if seed is not None and not 0 <= seed <= MAX_SEED - num_samples:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED - num_samples}, got {seed}")
    if stream and json_output:
        raise UsageError("--stream and --json do not combine (--json prints whole objects)")
    if stream and settings.beam_width > 1:
        raise UsageError("--stream does not work with beam search: the best beam is known only at the end")
    notes = []
    if settings.temperature == 0 and settings.beam_width == 1 and (settings.top_k or settings.top_p):
        notes.append("--top-k and --top-p do nothing when --temperature is 0 (greedy)")
    if settings.length_penalty != 1.0 and settings.beam_width == 1:
        notes.append("--length-penalty only matters with --beam-width > 1")
    if not settings.samples and num_samples > 1 and settings.beam_width == 1:
        notes.append("greedy decoding gives the same text for every sample; set --temperature to vary them")
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _run(
    prompt_arg: str | None,
    model_spec: str | None,
    settings: DecodeSettings,
    num_samples: int,
    seed: int | None,
    each_line: bool,
    stream: bool,
    completion_only: bool,
    json_output: bool,
    verbose: bool,
    device_name: str,
    dtype_name: str,
    batch_size: int,
    strict_precision: bool,
    logprobs: int | None,
) -> None:
    import secrets

    from gptcli.generate import beam_search
    from gptcli.tokenizer import get_tokenizer
    from gptcli.ui import console

    texts = _prompt_texts(prompt_arg, each_line)
    tokenizer = get_tokenizer()
    one_row = settings.beam_width == 1 and (len(texts) * num_samples == 1 or batch_size == 1)
    model, model_path, _, precision = load_for_inference(model_spec, device_name, dtype_name, strict_precision,
                                                         one_row)
    prompts = _tokenize_prompts(texts, tokenizer, model, each_line)  # all checked before any output

    base_seed = None
    if settings.samples:
        base_seed = seed if seed is not None else secrets.randbelow(2**32)
        if verbose:
            console.print(f"seed {base_seed}", markup=False, highlight=False, soft_wrap=True)

    def log(what: str, tokens: int, seconds: float) -> None:
        if verbose:
            console.print(
                f"{what}: {tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)",
                markup=False, highlight=False, soft_wrap=True,
            )

    out = _Output(tokenizer, settings, model_path, precision, each_line, stream, completion_only, json_output,
                  logprobs)
    started = time.perf_counter()
    if settings.beam_width > 1:
        for prompt in prompts:
            start = time.perf_counter()
            beams = beam_search(model, prompt.ids, settings, num_return=num_samples)
            log(f"beam search ({prompt.label})", sum(len(b.token_ids) for b in beams), time.perf_counter() - start)
            for beam in beams:
                out.finished(out.add_row(prompt, None), beam)
    else:
        seeds = [None if base_seed is None else base_seed + i for i in range(num_samples)]
        _decode_rows(model, [(p, s) for p in prompts for s in seeds], settings, batch_size, out, log)
    total_tokens = out.total_tokens
    seconds = time.perf_counter() - started
    console.print(
        f"generated {total_tokens} tokens in {seconds:.1f} s"
        + (f" ({total_tokens / max(seconds, 1e-9):.1f} tokens/s)" if verbose else ""),
        markup=False, highlight=False, soft_wrap=True,
    )
