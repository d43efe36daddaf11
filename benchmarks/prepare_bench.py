"""`gptcli prepare` throughput and memory against a plain loop over tiktoken's encode_ordinary_batch.

The corpus is generated: the-verdict's paragraphs, shuffled, written as files of about 1 MB into a
temporary directory (300 MB by default). Both sides tokenize the same files with the same number of
threads, each in a fresh process after loading the tokenizer (so its loading is not timed):

- baseline: read `4 × workers` files at a time and call `encode_ordinary_batch(texts,
  num_threads=workers)`, keeping only the token counts (it writes nothing);
- prepare:  `gptcli.prepare.prepare(DIR, OUT, workers=workers)`: streaming, safe chunking, ordered
  writes of train.bin/val.bin, sha256 of every file, meta.json.

Reported: tokens/s of each and their ratio, that both produced the same tokens per file (the sum),
and the peak memory (VmHWM, reset after the tokenizer is loaded) of each process.

    python benchmarks/prepare_bench.py                  # 300 MB, all cores, 1 round (a few minutes)
    python benchmarks/prepare_bench.py --size-mb 20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gptcli.assets import VERDICT  # noqa: E402

FILE_BYTES = 1 << 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(directory: Path, size_mb: int, seed: int = 0) -> tuple[int, int]:
    """Files of ~1 MB of shuffled paragraphs in 10 subdirectories; returns (files, bytes)."""
    paragraphs = [p.strip() for p in VERDICT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    total, files = 0, 0
    while total < size_mb * 10**6:
        parts, size = [], 0
        while size < FILE_BYTES:
            paragraph = rng.choice(paragraphs)
            parts.append(paragraph)
            size += len(paragraph) + 2
        path = directory / f"part{files % 10}" / f"doc{files:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "\n\n".join(parts).encode("utf-8")
        path.write_bytes(data)
        total += len(data)
        files += 1
    return files, total


def _kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, corpus: Path, out: Path, workers: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from gptcli.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    tokenizer.encode_ordinary("warm up")
    reset = _reset_peak()
    idle = _kib("VmRSS")
    files = sorted(p for p in corpus.rglob("*.txt"))
    started = time.perf_counter()
    if mode == "baseline":
        tokens = 0
        batch = 4 * workers
        for i in range(0, len(files), batch):
            texts = [p.read_text(encoding="utf-8") for p in files[i : i + batch]]
            tokens += sum(len(t) for t in tokenizer.encode_ordinary_batch(texts, num_threads=workers))
        document_tokens = tokens
    else:
        from gptcli.prepare import prepare

        *_, done = prepare([corpus], out, workers=workers, tokenizer=tokenizer, force=True)
        tokens = done.meta["tokens"]
        document_tokens = sum(s["tokens"] for s in done.meta["sources"])
    seconds = time.perf_counter() - started
    print(json.dumps({
        "mode": mode, "seconds": seconds, "tokens": tokens, "document_tokens": document_tokens,
        "bytes": sum(p.stat().st_size for p in files), "idle_rss_mib": idle / 1024,
        "peak_rss_mib": _kib("VmHWM") / 1024 if reset else None,
    }))


def measure(mode: str, corpus: Path, out: Path, workers: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--corpus", str(corpus), "--out", str(out), "--workers",
         str(workers)], capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=300, help="corpus size to generate (default 300)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating baseline/prepare rounds (best is kept)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", choices=["baseline", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.corpus, args.out, args.workers)
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus = Path(tmp) / "corpus"
        started = time.perf_counter()
        files, size = generate(corpus, args.size_mb)
        log(f"generated {files} files, {size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s")
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for mode in ("baseline", "prepare"):
                log(f"round {round_ + 1}: {mode} ...")
                r = measure(mode, corpus, Path(tmp) / "data", args.workers)
                log(f"  {r['tokens'] / r['seconds']:,.0f} tokens/s, {r['seconds']:.1f} s")
                if mode not in best or r["seconds"] < best[mode]["seconds"]:
                    best[mode] = r
    base, prep = best["baseline"], best["prepare"]
    figures = {
        "corpus_mb": size / 1e6, "files": files, "workers": args.workers,
        "baseline_tokens_per_s": base["tokens"] / base["seconds"],
        "prepare_tokens_per_s": prep["tokens"] / prep["seconds"],
        "ratio": (prep["tokens"] / prep["seconds"]) / (base["tokens"] / base["seconds"]),
        "prepare_mb_per_s": prep["bytes"] / prep["seconds"] / 1e6,
        "same_tokens": base["document_tokens"] == prep["document_tokens"],
        "baseline_peak_rss_mib": base["peak_rss_mib"], "prepare_peak_rss_mib": prep["peak_rss_mib"],
        "idle_rss_mib": prep["idle_rss_mib"],
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"corpus: {files} files, {size / 1e6:.0f} MB; {args.workers} worker thread(s)")
    print(f"{'':10} {'tokens/s':>12} {'peak RSS':>10}")
    for name, r in (("baseline", base), ("prepare", prep)):
        peak = f"{r['peak_rss_mib']:.0f} MiB" if r["peak_rss_mib"] is not None else "n/a"
        print(f"{name:10} {r['tokens'] / r['seconds']:>12,.0f} {peak:>10}")
    print(f"prepare / baseline throughput: {figures['ratio']:.2f} ({figures['prepare_mb_per_s']:.1f} MB/s of text); "
          f"same tokens: {'yes' if figures['same_tokens'] else 'NO'}; idle process: {prep['idle_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
