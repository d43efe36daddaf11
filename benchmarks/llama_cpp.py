"""gptcli's single-stream decoding against llama.cpp, the reference CPU engine, on the same weights.

    python benchmarks/llama_cpp.py                      # needs `make llama-cpp` (or GPTCLI_LLAMA_COMPLETION)
    python benchmarks/llama_cpp.py --tokens 200 --reps 3 --threads 2

One random GPT-2 124M model (context 1024, tied head, GPT-2-like weight scales) is written as a gptcli
file and converted with `gptcli convert --to gguf` to f32, f16 and q8_0. Each rep runs, interleaved,
gptcli's decoding path (`gptcli.generate.generate`, greedy, the 4-token prompt "Every effort moves
you", never stopping early) with fp32, bf16 and int8 weights, and `llama-completion` with the three
GGUF files (greedy, f32 KV cache, same prompt and thread count), reading llama.cpp's own "eval time"
(decoding only, its prompt excluded). The table gives the median tokens/s and each precision's ratio
gptcli / llama.cpp. Run it on an otherwise idle machine; only same-run ratios count.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO / "build" / "llama.cpp" / "build" / "bin" / "llama-completion"
PROMPT_TEXT = "Every effort moves you"
PROMPT_IDS = [6109, 3626, 6100, 345]
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"))  # gptcli --dtype, llama.cpp --gguf-type
EVAL_RATE = re.compile(r"(?<!prompt )eval time =.*?([0-9.]+) tokens per second")  # decoding, not the prompt


def write_models(directory: Path) -> tuple[Path, dict[str, Path]]:
    """The random 124M model as a gptcli file and as GGUF in each llama.cpp type."""
    from gptcli.config import get_preset
    from gptcli.model import GPT
    from gptcli.modelfile import save_model

    torch.manual_seed(123)
    model = GPT(get_preset("124M").replace(context_length=1024, tie_weights=True, qkv_bias=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    path = directory / "gpt2-random.safetensors"
    save_model(path, model)
    ggufs = {}
    for _, gguf_type in PAIRS:
        out = directory / f"gpt2-random-{gguf_type}.gguf"
        subprocess.run([sys.executable, "-m", "gptcli", "convert", str(path), "--to", "gguf", "--gguf-type",
                        gguf_type, "--out", str(out)], check=True, capture_output=True)
        ggufs[gguf_type] = out
    return path, ggufs


def gptcli_rate(model: torch.nn.Module, tokens: int) -> float:
    from gptcli.generate import generate

    prompt = torch.tensor([PROMPT_IDS])
    started = time.perf_counter()
    generated = generate(model, prompt, max_new_tokens=tokens, stop_at_eos=False)
    return len(generated[0]) / (time.perf_counter() - started)


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
    parser.add_argument("--binary", type=Path, default=Path(os.environ.get("GPTCLI_LLAMA_COMPLETION", DEFAULT_BINARY)))
    args = parser.parse_args(argv)
    if not args.binary.is_file():
        print(f"llama.cpp not found at {args.binary}: build it with `make llama-cpp`", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from gptcli.modelfile import load_model
    from gptcli.quantize import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        path, ggufs = write_models(Path(tmp))
        fp32, _ = load_model(path)
        models = {"fp32": fp32, "bf16": load_model(path, dtype=torch.bfloat16)[0],
                  "int8": quantize_model(load_model(path)[0])}
        gptcli_rate(fp32, 8)  # warm-up: kernels, prepacked weights, the allocator
        rates: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for dtype, gguf_type in PAIRS:
                rates.setdefault(f"gptcli {dtype}", []).append(gptcli_rate(models[dtype], args.tokens))
                rates.setdefault(f"llama.cpp {gguf_type}", []).append(
                    llama_rate(args.binary, ggufs[gguf_type], args.tokens, args.threads))
    print(f"{args.tokens} greedy tokens, random GPT-2 124M (ctx 1024, tied head), {args.threads} threads, "
          f"{args.reps} interleaved reps, load {os.getloadavg()[0]:.1f}")
    for dtype, gguf_type in PAIRS:
        ours, theirs = statistics.median(rates[f"gptcli {dtype}"]), statistics.median(rates[f"llama.cpp {gguf_type}"])
        spread = f"{min(rates[f'gptcli {dtype}']):.1f}-{max(rates[f'gptcli {dtype}']):.1f}"
        print(f"gptcli {dtype:5} {ours:7.1f} tok/s ({spread})   llama.cpp {gguf_type:5} {theirs:7.1f} tok/s   "
              f"ratio {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
