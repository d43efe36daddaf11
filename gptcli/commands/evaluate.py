"""Cross-entropy loss and perplexity of a model on text files, stdin, or a run's own train/val split."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from gptcli import jsonio
from gptcli.commands._common import (
    RUNTIME_PANEL,
    OutputOptions,
    RuntimeOptions,
    device_option,
    dtype_option,
    ignore_memory_check_option,
    strict_precision_option,
    threads_option,
)
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError
from gptcli.settings import Device, InferenceDtype

if TYPE_CHECKING:
    import numpy as np
    import tiktoken

    from gptcli.config import GPTConfig
    from gptcli.evaluate import EvalResult
    from gptcli.model import GPT

RUNTIME = RUNTIME_PANEL


@dataclass(frozen=True)
class Scoring:
    """How `eval` scores text: --stride between windows (None: the context length), --batch-size
    windows per forward pass, --max-tokens of each source (None: all), --per-token tables."""

    stride: int | None = None
    batch_size: int = 4
    max_tokens: int | None = None
    per_token: bool = False


def command(
    files: list[str] | None = typer.Argument(
        None, show_default=False,
        help="UTF-8 text files to score; '-' or piped text reads stdin.",
    ),
    run: str | None = typer.Option(
        None, "--run", show_default=False,
        help="Score this run's model on the run's own train and val split, the way training evaluates "
        "(its corpus, train ratio, stride and batch size; mean of batch losses).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", show_default=False, rich_help_panel=RUNTIME,
        help="Run directory or .safetensors file. Default: runs/latest.",
    ),
    stride: int | None = typer.Option(
        None, "--stride", show_default=False,
        help="Tokens between windows of the context length; below the context length each token is still "
        "scored once, with more earlier tokens as context (slower, lower loss). Default: the context length.",
    ),
    batch_size: int = typer.Option(
        4, "--batch-size", help="Windows per forward pass (the windows of all files are batched together).",
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", show_default=False, help="Score only the first N tokens of each source.",
    ),
    per_token: bool = typer.Option(
        False, "--per-token",
        help="For short texts: a table per source of each token, the probability the model gave it and its "
        "loss (-log of that probability: the chapter's section 5.1.2 target probabilities), with the mean "
        "loss and perplexity as the last row. Not with --run.",
    ),
    json_output: bool = typer.Option(
        False, "--json",
        help="One JSON object per source (source, tokens, loss, perplexity, dtype) instead of a table; with "
        "--per-token also per_token, a list of {position, token_id, token, prob, loss}.",
    ),
    device: Device = device_option(),
    dtype: InferenceDtype = dtype_option(),
    strict_precision: bool = strict_precision_option(),
    threads: int | None = threads_option(),
    ignore_memory_check: bool = ignore_memory_check_option(),
) -> None:
    from gptcli.runtime import set_threads

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if stride is not None and stride < 1:
        raise UsageError(f"--stride must be at least 1, got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (one token predicts the next), got {max_tokens}")
    if run is not None and model is not None:
        raise UsageError("--run evaluates the run's own model; leave out --model")
    if run is not None and per_token:
        raise UsageError("--per-token scores text FILES or stdin, not a run's splits (--run)")
    files = list(files or [])
    if files.count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    set_threads(threads)
    try:
        _run(files, run, Scoring(stride, batch_size, max_tokens, per_token),
             RuntimeOptions(run if run is not None else model, device, dtype, strict_precision, threads,
                            ignore_memory_check),
             OutputOptions(json=json_output))
    except KeyboardInterrupt:
        raise GptcliError("interrupted", EXIT_INTERRUPTED) from None


def _read_sources(files: list[str], run: str | None) -> list[tuple[str, str]]:
    """(name, text) of every file to score; stdin when piped and nothing else is given."""
    from gptcli.commands._common import read_stdin, stdin_is_piped
    from gptcli.textinput import STDIN_NAME, read_text_file

    if not files and run is None:
        if not stdin_is_piped():
            raise UsageError("nothing to evaluate: give text FILES, pipe text on stdin, or --run RUN_DIR")
        files = ["-"]
    sources = []
    for name in files:
        if name == "-":
            text = read_stdin()
            if not text.strip():
                raise UsageError("stdin is empty")
            sources.append((STDIN_NAME, text))
        else:
            sources.append((name, read_text_file(name)))
    return sources


def _run(files: list[str], run: str | None, scoring: Scoring, runtime: RuntimeOptions,
         output: OutputOptions) -> None:
    from gptcli.commands._common import load_for_inference
    from gptcli.evaluate import read_run_settings
    from gptcli.kernels.decoding import PackedWeights
    from gptcli.tokenizer import get_tokenizer

    run_batch = read_run_settings(run).batch_size if run is not None else 0  # a clear error before loading
    sources = _read_sources(files, run)  # read (and fail) before the model loads
    tokenizer = get_tokenizer()

    def plan(config: GPTConfig) -> tuple[int, int, int]:
        return _windows_at_once(config, sources, scoring, run_batch)

    loaded = load_for_inference(runtime, plan=plan, what="scoring")
    context_length = loaded.model.config.context_length
    if scoring.stride is not None and scoring.stride > context_length:
        raise UsageError(
            f"--stride must be between 1 and the context length ({context_length}), got {scoring.stride}"
        )
    started = time.perf_counter()
    with PackedWeights():  # one packing for the run's splits and every source
        results, scores = _score(loaded.model, loaded.device, run, sources, tokenizer, scoring)
    scored = sum(r.tokens for r in results)
    seconds = time.perf_counter() - started
    _say(f"scored {scored:,} tokens in {seconds:.1f} s ({scored / max(seconds, 1e-9):,.0f} tokens/s)")
    if scoring.per_token:
        _print_per_token(scores, tokenizer, loaded.precision, output.json)
    elif output.json:
        _print_json(results, loaded.precision)
    else:
        _print_table(results)


def _windows_at_once(config: GPTConfig, sources: list[tuple[str, str]], scoring: Scoring, run_batch: int
                     ) -> tuple[int, int, int]:
    """What `eval` scores at once, for the memory check (see `_common.Plan`): --batch-size windows of
    the context length (fewer when the sources hold fewer: a token is at least a byte, and windows
    start every --stride tokens), or the run's own batch size with --run; and their logits, every
    position's, twice (the logits and their log-softmax)."""
    context = config.context_length
    stride = min(scoring.stride or context, context)
    windows = 0
    for _, text in sources:
        tokens = len(text.encode("utf-8"))
        if scoring.max_tokens is not None:
            tokens = min(tokens, scoring.max_tokens)
        windows += -(-tokens // stride) + 1
    rows = max(run_batch, min(scoring.batch_size, windows))
    return rows, context, 2 * rows * context * config.vocab_size * 4


def _score(
    model: GPT, device: str, run: str | None, sources: list[tuple[str, str]], tokenizer: tiktoken.Encoding,
    scoring: Scoring,
) -> tuple[list[EvalResult], list[tuple[EvalResult, np.ndarray, np.ndarray]]]:
    """The results of the run's splits and of the sources, and with --per-token each source's tokens
    and their losses."""
    from gptcli.data import tokenize
    from gptcli.evaluate import evaluate_per_token, evaluate_run_splits, evaluate_sources
    from gptcli.ui import console

    results: list[EvalResult] = []
    scores: list[tuple[EvalResult, np.ndarray, np.ndarray]] = []
    if run is not None:
        _say(f"scoring the train and val split of {run}")
        results += evaluate_run_splits(model, run, tokenizer, scoring.max_tokens, device)
    if not sources:
        return results, scores
    named = [(name, tokenize(text, tokenizer)) for name, text in sources]
    what = named[0][0] if len(named) == 1 else f"{len(named)} sources"
    with console.status(f"scoring {what} ({sum(len(t) for _, t in named):,} tokens)") as status:

        def progress(done: int, total: int) -> None:
            status.update(f"scoring {what}: batch {done}/{total}")

        common = (scoring.stride, scoring.batch_size, scoring.max_tokens, device)
        if scoring.per_token:
            scores = evaluate_per_token(model, named, *common, on_batch=progress)
            results += [result for result, _, _ in scores]
        else:
            results += evaluate_sources(model, named, *common, on_batch=progress)
    return results, scores


def _say(line: str) -> None:
    """A line on stderr, as printed (no markup)."""
    from gptcli.ui import console

    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _print_json(results: list[EvalResult], precision: str) -> None:
    for result in results:
        sys.stdout.write(jsonio.dumps({**result.to_dict(), "dtype": precision}, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _print_per_token(
    scores: list[tuple[EvalResult, np.ndarray, np.ndarray]], tokenizer: tiktoken.Encoding, precision: str,
    json_output: bool,
) -> None:
    """--per-token: each source's tokens 1.. with the probability and loss of each (token 0 is context)."""
    import math

    from gptcli.commands._tables import per_token_table, print_table, shown
    from gptcli.tokenizer import token_text

    for result, ids, losses in scores:
        texts = [token_text(tokenizer, int(token)) for token in ids]
        if json_output:
            records = [
                {"position": i + 1, "token_id": int(ids[i + 1]), "token": texts[i + 1],
                 "prob": math.exp(-float(loss)), "loss": float(loss)}
                for i, loss in enumerate(losses.tolist())
            ]
            record = {**result.to_dict(), "dtype": precision, "per_token": records}
            sys.stdout.write(jsonio.dumps(record, ensure_ascii=False) + "\n")
            continue
        rows = [(i + 1, texts[i + 1], float(loss)) for i, loss in enumerate(losses.tolist())]
        table = per_token_table(rows, result.loss, result.perplexity, len(rows))
        table.title = f"{result.source}: token 0 {shown(texts[0])} is context only"
        print_table(table)
    sys.stdout.flush()


def _print_table(results: list[EvalResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(header_style="bold")
    table.add_column("source")
    for name in ("tokens", "loss", "perplexity"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(r.source, f"{r.tokens:,}", f"{r.loss:.4f}", f"{r.perplexity:,.2f}")
    # The table is the result: stdout (the rest of gptcli's chatter goes to stderr). In a pipe rich
    # would assume 80 columns and wrap long paths; size it to fit instead.
    width = None if sys.stdout.isatty() else max(80, max(len(r.source) for r in results) + 50)
    Console(file=sys.stdout, width=width).print(table)
