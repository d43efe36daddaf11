"""gptcli's single-stream decoding against llama.cpp, the reference CPU engine, on the same weights.

    python benchmarks/llama_cpp.py                      # needs `make llama-cpp` (or GPTCLI_LLAMA_COMPLETION)
    python benchmarks/llama_cpp.py --tokens 200 --reps 3 --threads 2
    python benchmarks/llama_cpp.py --model runs/x/model.safetensors   # a trained model instead

One random GPT-2 124M model (context 1024, tied head, GPT-2-like weight scales), or `--model`, is
written as a gptcli file and converted with `gptcli convert --to gguf` to f32, f16 and q8_0, and
with llama.cpp's `llama-quantize` to q4_0. Each rep runs, interleaved, gptcli's decoding path
(`gptcli.generate.generate` inside one packed-weights scope per model, as a `sample` run holds it;
greedy, the 4-token prompt "Every effort moves you", never stopping early) with fp32, bf16, int8 and
int4 weights, and `llama-completion` with the four GGUF files (greedy, f32 KV cache, same prompt
and thread count), reading llama.cpp's own "eval time" (decoding only, its prompt excluded). The
table gives the median tokens/s and each precision's ratio gptcli / llama.cpp.

Then the quantized models' perplexity on the-verdict against their full-precision model's, each
tool its own way (gptcli: `sliding_window_loss`; llama.cpp: `llama-perplexity`, which scores the
second half of each window): int8 and int4 against fp32, q8_0 and q4_0 against f32. A random
model's perplexity is about the vocabulary whatever its weights: pass a trained `--model` for a
meaningful figure. Run it on an otherwise idle machine; only same-run ratios count.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gptcli.model import GPT

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO / "build" / "llama.cpp" / "build" / "bin" / "llama-completion"
PROMPT_TEXT = "Every effort moves you"
PROMPT_IDS = [6109, 3626, 6100, 345]
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))  # gptcli --dtype, llama.cpp type
QUANTIZED_BY_LLAMA_CPP = {"q4_0"}  # made with llama-quantize from the f32 file (gptcli writes f32, f16, q8_0)
EVAL_RATE = re.compile(r"(?<!prompt )eval time =.*?([0-9.]+) tokens per second")  # decoding, not the prompt
PPL_ESTIMATE = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def write_models(directory: Path, binary: Path, model_path: Path | None) -> tuple[Path, dict[str, Path]]:
    """The model (`model_path`, or the random 124M one) as a gptcli file and as GGUF in each llama.cpp type."""
    from gptcli.config import get_preset
    from gptcli.model import GPT
    from gptcli.modelfile import save_model

    path = model_path or directory / "gpt2-random.safetensors"
    if model_path is None:
        torch.manual_seed(123)
        model = GPT(get_preset("124M").replace(context_length=1024, tie_weights=True, qkv_bias=True))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        save_model(path, model)
    ggufs: dict[str, Path] = {}
    for _, gguf_type in PAIRS:
        out = directory / f"model-{gguf_type}.gguf"
        if gguf_type in QUANTIZED_BY_LLAMA_CPP:
            subprocess.run([str(binary.parent / "llama-quantize"), str(ggufs["f32"]), str(out), gguf_type],
                           check=True, capture_output=True)
        else:
            subprocess.run([sys.executable, "-m", "gptcli", "convert", str(path), "--to", "gguf", "--gguf-type",
                            gguf_type, "--out", str(out)], check=True, capture_output=True)
        ggufs[gguf_type] = out
    return path, ggufs


def gptcli_rate(model: GPT, tokens: int, scope: Any) -> float:
    from gptcli.generate import generate

    prompt = torch.tensor([PROMPT_IDS])
    with scope:
        started = time.perf_counter()
        generated = generate(model, prompt, max_new_tokens=tokens, stop_at_eos=False)
        return len(generated[0]) / (time.perf_counter() - started)


def gptcli_perplexity(model: GPT, tokens: list[int]) -> float:
    from gptcli.evaluate import sliding_window_loss

    with torch.inference_mode():
        loss, _ = sliding_window_loss(model, tokens, batch_size=8)
    return math.exp(loss)


def llama_perplexity(binary: Path, gguf: Path, text: Path, context: int, threads: int) -> float:
    command = [str(binary.parent / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(context),
               "-b", str(context), "-t", str(threads), "--no-warmup"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    match = PPL_ESTIMATE.search(result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"no final estimate in llama-perplexity's output:\n{result.stderr[-2000:]}")
    return float(match.group(1))


def llama_rate(binary: Path, gguf: Path, tokens: int, threads: int) -> float:
    command = [str(binary), "-m", str(gguf), "-p", PROMPT_TEXT, "-n", str(tokens), "--temp", "0", "-ctk", "f32",
               "-ctv", "f32", "-c", "1024", "-t", str(threads), "-no-cnv", "--no-warmup", "--simple-io",
               "--no-display-prompt", "--perf", "--ignore-eos"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    match = EVAL_RATE.search(result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"no eval time in llama.cpp's output:\n{result.stderr[-2000:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", type=Path, help="a gptcli model file (default: random GPT-2 124M weights)")
    parser.add_argument("--binary", type=Path, default=Path(os.environ.get("GPTCLI_LLAMA_COMPLETION", DEFAULT_BINARY)))
    args = parser.parse_args(argv)
    if not args.binary.is_file():
        print(f"llama.cpp not found at {args.binary}: build it with `make llama-cpp`", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path, ggufs = write_models(Path(tmp), args.binary, args.model)
        models = load_models(path)
        rates = decoding_rates(args, models, ggufs)
        perplexities = compare_perplexities(args, models, ggufs)
    print(f"{args.tokens} greedy tokens, {args.model or 'random GPT-2 124M (ctx 1024, tied head)'}, "
          f"{args.threads} threads, {args.reps} interleaved reps, load {os.getloadavg()[0]:.1f}")
    for dtype, gguf_type in PAIRS:
        ours, theirs = statistics.median(rates[f"gptcli {dtype}"]), statistics.median(rates[f"llama.cpp {gguf_type}"])
        spread = f"{min(rates[f'gptcli {dtype}']):.1f}-{max(rates[f'gptcli {dtype}']):.1f}"
        print(f"gptcli {dtype:5} {ours:7.1f} tok/s ({spread})   llama.cpp {gguf_type:5} {theirs:7.1f} tok/s   "
              f"ratio {ours / theirs:.2f}x")
    print("perplexity on the-verdict (each tool's own method; the change against its full-precision model):")
    for name, (ppl, base) in perplexities.items():
        print(f"  {name:16} {ppl:10.2f}   vs {base:10.2f}   {100 * (ppl / base - 1):+.2f}%")
    return 0


def load_models(path: Path) -> dict[str, GPT]:
    from gptcli.modelfile import load_model
    from gptcli.quantize import quantize_model

    return {"fp32": load_model(path)[0], "bf16": load_model(path, dtype=torch.bfloat16)[0],
            "int8": quantize_model(load_model(path)[0]), "int4": quantize_model(load_model(path)[0], bits="int4")}


def decoding_rates(args: argparse.Namespace, models: dict[str, GPT], ggufs: dict[str, Path]
                   ) -> dict[str, list[float]]:
    """Tokens/s of each gptcli dtype and llama.cpp type, `args.reps` interleaved runs each."""
    from gptcli.kernels.decoding import PackedWeights

    scopes = {dtype: PackedWeights() for dtype in models}  # packed once per model, as `sample` does
    for dtype, model in models.items():
        gptcli_rate(model, 8, scopes[dtype])  # warm-up: kernels, prepacked weights, the allocator
    rates: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for dtype, gguf_type in PAIRS:
            rates.setdefault(f"gptcli {dtype}", []).append(gptcli_rate(models[dtype], args.tokens, scopes[dtype]))
            rates.setdefault(f"llama.cpp {gguf_type}", []).append(
                llama_rate(args.binary, ggufs[gguf_type], args.tokens, args.threads))
    return rates


def compare_perplexities(args: argparse.Namespace, models: dict[str, GPT], ggufs: dict[str, Path]
                         ) -> dict[str, tuple[float, float]]:
    """name -> (perplexity, the full-precision model's) for gptcli int8/int4 and llama.cpp q8_0/q4_0."""
    from gptcli.assets import VERDICT
    from gptcli.tokenizer import encode, get_tokenizer

    tokens = encode(get_tokenizer(), VERDICT.read_text(encoding="utf-8"))
    ours = {dtype: gptcli_perplexity(models[dtype], tokens) for dtype in ("fp32", "int8", "int4")}
    context = min(1024, models["fp32"].config.context_length)
    theirs = {t: llama_perplexity(args.binary, ggufs[t], VERDICT, context, args.threads)
              for t in ("f32", "q8_0", "q4_0")}
    return {"gptcli int8": (ours["int8"], ours["fp32"]), "gptcli int4": (ours["int4"], ours["fp32"]),
            "llama.cpp q8_0": (theirs["q8_0"], theirs["f32"]), "llama.cpp q4_0": (theirs["q4_0"], theirs["f32"])}


if __name__ == "__main__":
    sys.exit(main())
