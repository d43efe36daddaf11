"""Generate text from a trained or converted model: greedy, temperature, top-k, top-p or beam search."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from gptcli.commands._common import (
    RUNTIME_PANEL,
    RuntimeOptions,
    device_option,
    dtype_option,
    ignore_memory_check_option,
    load_for_inference,
    read_stdin,
    stdin_is_piped,
    strict_precision_option,
    threads_option,
)
from gptcli.commands._sample_output import Printer, Prompt, SampleOutput, write
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError
from gptcli.logprobs import MAX_TOP_LOGPROBS
from gptcli.sampling import DEFAULT_BATCH_SIZE
from gptcli.settings import DEFAULT_PROMPT, Device, InferenceDtype

if TYPE_CHECKING:
    from collections.abc import Iterator

    import tiktoken

    from gptcli.config import GPTConfig
    from gptcli.model import GPT
    from gptcli.sampling import DecodeSettings

Log = Callable[[str, int, float], None]  # what, tokens, seconds: a --verbose line
MAX_LENGTH_PENALTY = 10.0  # length ** penalty must stay a finite, non-zero float for any length
DECODING = "Decoding"
OUTPUT = "Input and output"
RUNTIME = RUNTIME_PANEL
CHUNK_ROWS = 4096
"""Rows handed to the engine at a time (at least --batch-size): prompts x --num-samples rows are made
as they are needed, so a huge --num-samples streams its samples instead of listing them all first."""
HELD_TOKEN_BYTES = 64
"""About what a new token costs until its row finishes (its id in the row's lists, its text)."""


@dataclass(frozen=True)
class RowOptions:
    """The rows `sample` decodes besides each prompt: --num-samples per prompt, --seed of the first
    (sample i uses seed + i; None: a random one when sampling), --batch-size rows at a time."""

    num_samples: int = 1
    seed: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE


# --- prompts and decoding ---------------------------------------------------------------------


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
    texts: list[str], tokenizer: tiktoken.Encoding, config: GPTConfig, each_line: bool
) -> list[Prompt]:
    from gptcli.tokenizer import EOT_ID, encode

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


def _decode_rows(
    model: GPT, all_rows: Iterator[tuple[Prompt, int | None]], settings: DecodeSettings, batch_size: int,
    out: Printer, log: Log,
) -> None:
    """Every (prompt, seed) row decoded in batches (gptcli.batched), printed through `out`, CHUNK_ROWS
    rows at a time (each row gives the same tokens whatever its neighbours)."""
    from itertools import islice

    from gptcli.batched import decode_batch

    started = time.perf_counter()
    while rows := list(islice(all_rows, max(batch_size, CHUNK_ROWS))):
        first = out.added
        for prompt, seed in rows:
            out.add_row(prompt, seed)
        events = decode_batch(model, [p.ids for p, _ in rows], settings, [s for _, s in rows], batch_size,
                              tokens=out.options.stream, logprobs=out.options.logprobs)
        for event in events:
            if event.generation is None:
                out.token(first + event.row, event.token)  # type: ignore[arg-type]
                continue
            out.finished(first + event.row, event.generation)
            label = rows[event.row][0].label
            log(f"row {first + event.row + 1} ({label})", len(event.generation.token_ids),
                time.perf_counter() - started)


def _beam_rows(model: GPT, prompts: list[Prompt], settings: DecodeSettings, num_samples: int, out: Printer,
               log: Log) -> None:
    """The best `num_samples` beams of each prompt, one prompt at a time, printed through `out`."""
    from gptcli.beam import beam_search

    for prompt in prompts:
        start = time.perf_counter()
        beams = beam_search(model, prompt.ids, settings, num_return=num_samples)
        log(f"beam search ({prompt.label})", sum(len(b.token_ids) for b in beams), time.perf_counter() - start)
        for beam in beams:
            out.finished(out.add_row(prompt, None), beam)


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
    ignore_memory_check: bool = ignore_memory_check_option(),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", rich_help_panel=RUNTIME,
        help="Rows (every prompt or line x --num-samples) decoded together; each row gives the same tokens "
        "as alone, and a finished row's slot goes to the next one. Beam search decodes one prompt at a time.",
    ),
) -> None:
    from gptcli.runtime import set_threads
    from gptcli.sampling import DecodeSettings

    settings = DecodeSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        beam_width=beam_width, length_penalty=length_penalty, stop_at_eos=stop_at_eos,
    )
    # The checks the core makes too (one place, the same words), then the command's own.
    settings.validate(min_new_tokens=1, num_samples=num_samples, seed=seed, logprobs=logprobs, batch_size=batch_size)
    output = SampleOutput(json=json_output, verbose=verbose, each_line=each_line, stream=stream,
                          completion_only=completion_only, logprobs=logprobs)
    _check_options(settings, num_samples, output)
    set_threads(threads)
    try:
        _run(prompt, settings, RowOptions(num_samples, seed, batch_size),
             RuntimeOptions(model, device, dtype, strict_precision, threads, ignore_memory_check), output)
    except KeyboardInterrupt:
        if stream:
            write("\n")
        raise GptcliError("interrupted", EXIT_INTERRUPTED) from None


def _check_options(settings: DecodeSettings, num_samples: int, output: SampleOutput) -> None:
    """What only the command refuses (or notes): combinations of decoding and output options."""
    from gptcli.ui import console

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
    if output.stream and output.json:
        raise UsageError("--stream and --json do not combine (--json prints whole objects)")
    if output.stream and settings.beam_width > 1:
        raise UsageError("--stream does not work with beam search: the best beam is known only at the end")
    if output.logprobs is not None and output.each_line and not output.json:
        raise UsageError("--logprobs prints a table after each text, which --each-line's one result per line "
                         "cannot hold; add --json")
    notes = []
    if settings.temperature == 0 and settings.beam_width == 1 and (settings.top_k or settings.top_p):
        notes.append("--top-k and --top-p do nothing when --temperature is 0 (greedy)")
    if settings.length_penalty != 1.0 and settings.beam_width == 1:
        notes.append("--length-penalty only matters with --beam-width > 1")
    if not settings.samples and num_samples > 1 and settings.beam_width == 1:
        notes.append("greedy decoding gives the same text for every sample; set --temperature to vary them")
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


def _run(prompt_arg: str | None, settings: DecodeSettings, rows: RowOptions, runtime: RuntimeOptions,
         output: SampleOutput) -> None:
    from gptcli.kernels.decoding import PackedWeights
    from gptcli.tokenizer import get_tokenizer

    texts = _prompt_texts(prompt_arg, output.each_line)
    tokenizer = get_tokenizer()
    one_row = settings.beam_width == 1 and (len(texts) * rows.num_samples == 1 or rows.batch_size == 1)
    prompts: list[Prompt] = []

    def plan(config: GPTConfig) -> tuple[int, int, int]:
        prompts.extend(_tokenize_prompts(texts, tokenizer, config, output.each_line))  # all checked first
        return _rows_at_once(config, prompts, settings, rows)

    loaded = load_for_inference(runtime, one_row, plan, f"decoding up to {settings.max_new_tokens:,} new tokens")
    base_seed = _base_seed(settings, rows.seed, output.verbose)
    log = _log_lines(output.verbose)
    out = Printer(tokenizer, settings, loaded.path, loaded.precision, output)
    started = time.perf_counter()
    with PackedWeights():  # one packing of the weights for every prompt
        if settings.beam_width > 1:
            _beam_rows(loaded.model, prompts, settings, rows.num_samples, out, log)
        else:
            all_rows = ((p, None if base_seed is None else base_seed + i)
                        for p in prompts for i in range(rows.num_samples))
            _decode_rows(loaded.model, all_rows, settings, rows.batch_size, out, log)
    total_tokens = out.total_tokens
    seconds = time.perf_counter() - started
    _say(f"generated {total_tokens} tokens in {seconds:.1f} s"
         + (f" ({total_tokens / max(seconds, 1e-9):.1f} tokens/s)" if output.verbose else ""))


def _rows_at_once(config: GPTConfig, prompts: list[Prompt], settings: DecodeSettings, rows: RowOptions
                  ) -> tuple[int, int, int]:
    """What `sample` decodes at once, for the memory check (see `_common.Plan`): the beams, or
    --batch-size rows (fewer when there are fewer rows); a cache as long as gptcli.batched.start makes
    it (the longest prompt and the new tokens, at most the context: longer rows slide a window); and
    the new tokens each row keeps until it finishes (a beam's up to its prompt's length more)."""
    longest = max(len(p.ids) for p in prompts)
    if settings.beam_width > 1:
        at_once = settings.beam_width
        held = 2 * at_once * (longest + settings.max_new_tokens)  # the live beams and as many finished
    else:
        at_once = min(rows.batch_size, len(prompts) * rows.num_samples)
        held = at_once * settings.max_new_tokens
    length = min(config.context_length, longest + settings.max_new_tokens - 1)
    return at_once, length, held * HELD_TOKEN_BYTES


def _base_seed(settings: DecodeSettings, seed: int | None, verbose: bool) -> int | None:
    """The first sample's seed: --seed, or a random one (shown with --verbose); None when nothing samples."""
    import secrets

    if not settings.samples:
        return None
    base_seed = seed if seed is not None else secrets.randbelow(2**32)
    if verbose:
        _say(f"seed {base_seed}")
    return base_seed


def _log_lines(verbose: bool) -> Log:
    """--verbose's timing line of a row or beam search (nothing without --verbose)."""

    def log(what: str, tokens: int, seconds: float) -> None:
        if verbose:
            _say(f"{what}: {tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)")

    return log


def _say(line: str) -> None:
    """A line on stderr, as printed (no markup)."""
    from gptcli.ui import console

    console.print(line, markup=False, highlight=False, soft_wrap=True)
