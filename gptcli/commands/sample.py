"""Generate text from a trained or converted model: greedy, temperature, top-k, top-p or beam search."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from gptcli.commands._common import load_for_inference, read_stdin, stdin_is_piped
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError

if TYPE_CHECKING:
    import tiktoken

    from gptcli.generate import DecodeSettings, Generation
    from gptcli.model import GPT

DEFAULT_PROMPT = "Every effort moves you"
MAX_SEED = 2**63 - 1
MAX_LENGTH_PENALTY = 10.0  # length ** penalty must stay a finite, non-zero float for any length
DECODING = "Decoding"
OUTPUT = "Input and output"
RUNTIME = "Model and runtime"


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


def _text_pieces(tokenizer: tiktoken.Encoding, tokens: Iterator[int], seen: list[int]) -> Iterator[str]:
    """Text of each new token as it comes; a character split across tokens waits for its last byte."""
    import codecs

    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        seen.append(token)
        if token < tokenizer.n_vocab:
            piece = utf8.decode(tokenizer.decode_single_token_bytes(token))
            if piece:
                yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


def _one_line(text: str) -> str:
    """`--each-line` keeps one result per line: newlines become spaces (the chapter's compact print)."""
    return re.sub(r"\r\n|\r|\n", " ", text)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


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
    stream: bool = typer.Option(False, "--stream", rich_help_panel=OUTPUT, help="Print tokens as they come."),
    completion_only: bool = typer.Option(
        False, "--completion-only", rich_help_panel=OUTPUT, help="Print only the new text, not the prompt.",
    ),
    json_output: bool = typer.Option(
        False, "--json", rich_help_panel=OUTPUT,
        help="One JSON object per sample per line: prompt, completion, token_ids, finish_reason, model, "
        "seed, settings.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", rich_help_panel=OUTPUT, help="Timing and tokens/s per sample on stderr.",
    ),
    device: str = typer.Option("auto", "--device", rich_help_panel=RUNTIME, help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option(
        "fp32", "--dtype", rich_help_panel=RUNTIME, help="Weights for inference: fp32 or bf16.",
    ),
    threads: int | None = typer.Option(
        None, "--threads", show_default=False, rich_help_panel=RUNTIME,
        help="CPU threads for torch (default: one per core).",
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
    set_threads(threads)
    try:
        _run(prompt, model, settings, num_samples, seed, each_line, stream, completion_only, json_output,
             verbose, device, dtype)
    except KeyboardInterrupt:
        if stream:
            _write("\n")
        raise GptcliError("interrupted", EXIT_INTERRUPTED) from None


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
) -> None:
    import secrets

    from gptcli.generate import beam_search, finish_reason, make_generator, sample
    from gptcli.generate import stream as stream_tokens
    from gptcli.tokenizer import get_tokenizer
    from gptcli.ui import console

    texts = _prompt_texts(prompt_arg, each_line)
    tokenizer = get_tokenizer()
    model, model_path, device = load_for_inference(model_spec, device_name, dtype_name)
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

    total_tokens, started = 0, time.perf_counter()
    first = True
    for prompt in prompts:
        if settings.beam_width > 1:
            start = time.perf_counter()
            beams = beam_search(model, prompt.ids, settings, num_return=num_samples)
            log(f"beam search ({prompt.label})", sum(len(b.token_ids) for b in beams),
                time.perf_counter() - start)
            runs: list[tuple[Generation | None, int | None]] = [(b, None) for b in beams]
        else:
            runs = [(None, None if base_seed is None else base_seed + i) for i in range(num_samples)]
        for index, (beam, sample_seed) in enumerate(runs):
            generator = make_generator(sample_seed, device) if sample_seed is not None else None
            if not (each_line or json_output or first):
                _write("\n")  # a blank line between samples
            first = False
            head = "" if completion_only else prompt.text
            if each_line:
                head = _one_line(head)
            start = time.perf_counter()
            if stream:
                ids: list[int] = []
                _write(head)
                tokens = stream_tokens(model, prompt.ids, settings, generator)
                for piece in _text_pieces(tokenizer, tokens, ids):
                    _write(_one_line(piece) if each_line else piece)
                _write("\n")
                new_ids, reason = ids, finish_reason(len(ids), settings)
            else:
                generation = beam or sample(model, prompt.ids, settings, generator)
                new_ids, reason = generation.token_ids, generation.finish_reason
            total_tokens += len(new_ids)
            if beam is None:
                log(f"sample {index + 1} ({prompt.label})", len(new_ids), time.perf_counter() - start)
            if stream:
                continue
            completion = _decode(tokenizer, new_ids)
            if json_output:
                record: dict[str, Any] = {
                    "prompt": prompt.text, "completion": completion, "token_ids": new_ids,
                    "finish_reason": reason, "model": model_path, "seed": sample_seed,
                    "settings": settings.to_dict(),
                }
                _write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                text = head + completion
                _write((_one_line(text) if each_line else text) + "\n")
    seconds = time.perf_counter() - started
    console.print(
        f"generated {total_tokens} tokens in {seconds:.1f} s"
        + (f" ({total_tokens / max(seconds, 1e-9):.1f} tokens/s)" if verbose else ""),
        markup=False, highlight=False, soft_wrap=True,
    )
