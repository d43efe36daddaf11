"""The measurements behind benchmarks/gpu_check.sh: gptcli on a CUDA GPU, against the CPU and nanoGPT.

Each subcommand does one part and writes its result as JSON (`--json PATH`): checks (ok or not,
with the value and the limit) and measurements (tokens/s, MFU). `report` merges the parts into
gpu_check.json and prints the summary table. Run from the repository root:

    python benchmarks/gpu_check.py deps  --device cuda --json deps.json
    python benchmarks/gpu_check.py train --device cuda --precision bf16 --compile --json t.json --scratch /tmp/x
    python benchmarks/gpu_check.py check --device cpu --quick --model m.safetensors --json c.json --scratch /tmp/x

`--quick` shrinks every shape (the tiny preset, context 64) so the whole script can be tried on a
CPU (`--device cpu`); there the bf16 paths are forced on (GPTCLI_CPU_BF16=1) so they run too.

Loaded by pytest as a plugin (`-p benchmarks.gpu_check`), it keeps only the tests of shard
GPU_CHECK_SHARD=i/n, so the script can run the test files in parallel processes.

Figures of merit. Training MFU: tokens/s x FLOPs per token over the GPU's dense peak, with FLOPs
per token = 6 N + 12 L C T as nanoGPT's `estimate_mfu` (N: the parameters that multiply, embeddings
excluded, the untied head included; as `train_flops_per_token` in benchmarks/plan.py). The peak is
bf16's for bf16 autocast, else fp32's (tf32's when torch allows TF32 matmuls). Decoding one row:
tokens/s over the bound set by reading every weight once per token at the GPU's memory bandwidth.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    import pytest
    import torch

    from gptcli.choices import Device, Precision
    from gptcli.config import GPTConfig
    from gptcli.model import GPT

CORE_DEPS = ("torch", "numpy", "tiktoken", "typer", "rich", "safetensors", "gptcli")
TEST_DEPS = ("pytest", "matplotlib")  # matplotlib: the training tests write loss plots
PROMPT = "Every effort moves you"
FP32_TOL = 1e-4  # max |cuda - cpu| / max |cpu| of fp32 logits
BF16_TOL = 5e-2  # bf16 weights: 0.9% measured on CPU (124M, random init)
INT8_TOL = 3e-2  # int8 against fp32: 0.5% measured on CPU
TIE_TOL = 1e-4  # a greedy token may differ where the top two logits are this close (relative)
LOSS_TOL = 1e-3  # training losses, cuda fp32 against cpu fp32
BF16_LOSS_TOL = 2e-2  # cuda bf16 autocast against cpu fp32 (1.8e-4 between the two on a CPU)


@dataclass(frozen=True)
class Peaks:
    """Dense peaks in TFLOP/s (without sparsity) and the memory bandwidth in GB/s, from NVIDIA's data sheets."""

    name: str
    bf16: float
    tf32: float
    fp32: float
    hbm_gbps: float


# First match of a substring of torch.cuda.get_device_name() wins (e.g. "NVIDIA H100 80GB HBM3" is SXM).
PEAKS = (
    ("H100 PCIe", Peaks("H100 PCIe", 756, 378, 51, 2000)),
    ("H100 NVL", Peaks("H100 NVL", 835, 418, 60, 3900)),
    ("H200 NVL", Peaks("H200 NVL", 835, 418, 60, 4800)),
    ("H100", Peaks("H100 SXM", 989, 495, 67, 3350)),
    ("H200", Peaks("H200 SXM", 989, 495, 67, 4800)),
    ("A100", Peaks("A100 SXM", 312, 156, 19.5, 2039)),
)


@dataclass
class Check:
    name: str
    ok: bool
    value: Any = None
    limit: Any = None
    note: str = ""
    strict: bool = True  # False: reported (warn), does not fail the run


@dataclass
class Result:
    """A part's checks and measurements, written to `path` as each comes (a part cut off by its timeout
    still reports what it did)."""

    part: str
    path: str | None
    checks: list[Check] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, value: Any = None, limit: Any = None, note: str = "",
              strict: bool = True) -> None:
        self.checks.append(Check(name, bool(ok), value, limit, note, strict))
        print(f"  {'ok  ' if ok else ('FAIL' if strict else 'warn')} {name}: {value} (limit {limit}) {note}",
              flush=True)
        self.write()

    def measure(self, row: dict[str, Any]) -> None:
        self.measurements.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def passed(self) -> bool:
        return all(c.ok or not c.strict for c in self.checks)

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")


@dataclass(frozen=True)
class Shapes:
    preset: str
    context: int
    batch: int
    steps: int
    decode_tokens: int
    reps: int


def shapes(quick: bool) -> Shapes:
    if quick:
        return Shapes("tiny", 64, 4, 8, 16, 2)
    return Shapes("124M", 1024, 8, 25, 128, 3)


# --- environment --------------------------------------------------------------------------------


def gpu_peaks(name: str) -> Peaks | None:
    return next((peaks for key, peaks in PEAKS if key in name), None)


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0],
                            "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peaks = gpu_peaks(name)
        info.update(gpu=name, capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    peaks=asdict(peaks) if peaks else None)
    return info


def missing_modules(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install counts as missing, with its reason
            missing.append(f"{name} ({type(exc).__name__}: {exc})" if not isinstance(exc, ImportError) else name)
    return missing


def cmd_deps(args: argparse.Namespace) -> int:
    """One line and exit 2 when a dependency is missing or CUDA is not there; else the environment."""
    missing = missing_modules(CORE_DEPS)
    if missing:
        print(f"gpu_check: {args.python_name} lacks {', '.join(missing)}: use a Python that has torch with CUDA "
              "and gptcli's dependencies (PYTHON=...; PYTHONPATH may add a directory of them)")
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")
        return 2
    result = Result("deps", args.json, info=device_info(args.device))
    result.info["test_deps_missing"] = missing = missing_modules(TEST_DEPS)
    info = result.info
    result.write()
    print(json.dumps(info))
    lacking = f"; the tests lack {', '.join(missing)}" if missing else ""
    where = info.get("gpu", args.device)
    print(f"{where}, torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}{lacking}")
    return 0


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_params(config: GPTConfig) -> int:
    """Parameters that multiply per token: every block's linear layers and the output head."""
    return config.n_layers * 12 * config.emb_dim**2 + config.vocab_size * config.emb_dim


def train_flops_per_token(config: GPTConfig) -> float:
    return 6 * matmul_params(config) + 12 * config.n_layers * config.emb_dim * config.context_length


def train_peak(info: dict[str, Any], precision: str) -> tuple[float | None, str]:
    """The dense peak (FLOP/s) a run in `precision` is held against, and its name."""
    peaks = info.get("peaks")
    if not peaks:
        return None, "no known peak"
    if precision == "bf16":
        return peaks["bf16"] * 1e12, f"{peaks['bf16']:g} TFLOP/s bf16"
    kind = "tf32" if info.get("tf32_matmul") else "fp32"
    return peaks[kind] * 1e12, f"{peaks[kind]:g} TFLOP/s {kind}"


def mfu(tokens_per_second: float, config: GPTConfig, info: dict[str, Any], precision: str) -> dict[str, Any]:
    peak, label = train_peak(info, precision)
    flops = tokens_per_second * train_flops_per_token(config)
    return {"tflops": round(flops / 1e12, 2), "mfu": round(flops / peak, 4) if peak else None, "peak": label}


# --- data and models ----------------------------------------------------------------------------


def source_text() -> str:
    """The chapter's corpus bundled with gptcli; without it, the repository's own text."""
    from gptcli.assets import VERDICT

    if VERDICT.is_file():
        return VERDICT.read_text(encoding="utf-8")
    files = sorted(ROOT.glob("gptcli/**/*.py")) + sorted(ROOT.glob("*.md"))
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def ensure_corpus(scratch: Path, tokens: int) -> Path:
    """A text file of at least `tokens` GPT-2 tokens: the source text repeated."""
    from gptcli.tokenizer import encode, get_tokenizer

    text = source_text()
    per_copy = len(encode(get_tokenizer(), text))
    copies = max(1, math.ceil(tokens / per_copy))
    path = scratch / f"corpus-{copies}.txt"
    if not path.is_file():
        path.write_text("\n".join([text] * copies), encoding="utf-8")
    return path


def fresh_path(scratch: Path, prefix: str) -> Path:
    """A path under `scratch` that does not exist yet (runs refuse a directory holding a run)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=scratch)) / "run"


def prompt_ids(count: int, max_len: int) -> list[list[int]]:
    """`count` prompts of different lengths: the corpus's first non-empty lines."""
    from gptcli.tokenizer import encode, get_tokenizer

    tokenizer = get_tokenizer()
    lines = [line for line in source_text().splitlines() if line.strip()]
    return [encode(tokenizer, line)[:max_len] or [0] for line in lines[:count]]


def load(path: Path, device: str, dtype: str) -> GPT:
    import torch

    from gptcli.modelfile import load_model
    from gptcli.quantize import quantize_model

    model, _ = load_model(path, device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if dtype in ("int8", "int4"):
        quantize_model(model, bits=dtype)  # in place, as `sample --dtype int8/int4` loads it
    return model


def cmd_model(args: argparse.Namespace) -> int:
    """A seeded, untrained gptcli model file of the preset (as tests/conftest.py's model_file)."""
    import torch

    from gptcli.config import get_preset
    from gptcli.model import GPT
    from gptcli.modelfile import save_model

    torch.manual_seed(1)
    save_model(args.model, GPT(get_preset(shapes(args.quick).preset)))
    print(f"wrote {args.model}")
    return 0


# --- training -----------------------------------------------------------------------------------


@dataclass
class TrainRun:
    losses: list[float]
    times: list[float]  # perf_counter at each step's end
    precision: str
    notices: list[str]
    tokens_per_step: int


def run_training(settings: Any) -> TrainRun:
    """gptcli's own training loop (gptcli.train.train, what `gptcli train` runs), timed per step."""
    from gptcli.events import Notice, RunStarted, StepDone
    from gptcli.train import train

    run = TrainRun([], [], settings.precision, [], settings.batch_size * settings.config.context_length)
    for event in train(settings):
        if isinstance(event, StepDone):
            sync(settings.device)
            run.times.append(time.perf_counter())
            run.losses.append(event.loss)
        elif isinstance(event, RunStarted):
            run.precision = event.precision
        elif isinstance(event, Notice):
            run.notices.append(event.text)
    return run


def train_settings(args: argparse.Namespace, corpus: Path, out: Path, config: GPTConfig, steps: int,
                   batch: int, precision: Precision, compile_model: bool = False, lr: float = 4e-4,
                   device: Device | None = None) -> Any:
    from gptcli.settings import TrainSettings

    return TrainSettings(corpus=str(corpus), config=config, out=str(out), epochs=1, batch_size=batch, lr=lr,
                         max_steps=steps, eval_freq=10**9, eval_iter=1, sample_tokens=0, plots=False,
                         device=device or args.device, precision=precision, compile=compile_model, seed=123)


def steady_rate(run: TrainRun, warmup: int) -> float:
    """Tokens/s over the steps after the first `warmup` (compilation, allocator, the step-0 evaluation)."""
    first = min(warmup, len(run.times) - 2)
    return run.tokens_per_step * (len(run.times) - 1 - first) / (run.times[-1] - run.times[first])


def cmd_train(args: argparse.Namespace) -> int:
    """A training burst of gptcli's 124M (context 1024, batch 8) through its training loop."""
    from gptcli.config import get_preset

    shape = shapes(args.quick)
    config = get_preset(shape.preset).replace(context_length=shape.context)
    corpus = ensure_corpus(args.scratch, int((shape.steps * shape.batch + 8) * shape.context / 0.85))
    name = f"train {shape.preset} T{shape.context} b{shape.batch} {args.precision}{' compile' if args.compile else ''}"
    result = Result(name, args.json, info=device_info(args.device))
    started = time.perf_counter()
    settings = train_settings(args, corpus, fresh_path(args.scratch, "train-"), config, shape.steps, shape.batch,
                              args.precision, args.compile)
    run = run_training(settings)
    warmup = 5 if args.compile else 3
    rate = steady_rate(run, warmup)
    row = {"case": name, "tokens_per_second": round(rate, 1), **mfu(rate, config, result.info, run.precision),
           "setup_and_first_step_s": round(run.times[0] - started, 1), "steps": len(run.times), "warmup_steps": warmup,
           "precision_ran": run.precision, "final_loss": run.losses[-1]}
    if args.device.startswith("cuda"):
        import torch

        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result.measure(row)
    result.check(f"{name}: ran {args.precision}", run.precision == args.precision, run.precision, args.precision)
    result.check(f"{name}: finite losses", all(math.isfinite(x) for x in run.losses), f"last {run.losses[-1]:.3f}")
    fell_back = [n for n in run.notices if "compile failed" in n]
    result.check(f"{name}: no fallback", not fell_back, "; ".join(run.notices) or "no notices",
                 strict=args.device.startswith("cuda"))
    result.write()
    shutil.rmtree(Path(settings.out).parent, ignore_errors=True)  # 2 GB of checkpoint at 124M
    return 0 if result.passed() else 1


# --- nanoGPT's step -----------------------------------------------------------------------------


def random_batches(config: GPTConfig, batch: int, device: str, count: int = 4) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, config.vocab_size, (batch, config.context_length + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def nanogpt_step(config: GPTConfig, device: str, compile_model: bool) -> Callable[[Any, Any], float]:
    """nanoGPT's train.py step: bf16 autocast, loss in forward, clip 1.0, its fused AdamW, loss read back."""
    import torch

    from benchmarks.nanogpt import NanoConfig, NanoGPT

    torch.manual_seed(123)
    model = NanoGPT(NanoConfig(block_size=config.context_length, vocab_size=config.vocab_size,
                               n_layer=config.n_layers, n_head=config.n_heads, n_embd=config.emb_dim,
                               dropout=config.drop_rate)).to(device).train()
    optimizer = model.configure_optimizers(0.1, 4e-4, (0.9, 0.95), device.split(":")[0])
    forward = torch.compile(model) if compile_model else model

    def step(x: Any, y: Any) -> float:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def gptcli_step(config: GPTConfig, device: str, compile_model: bool) -> Callable[[Any, Any], float]:
    """gptcli's model and optimizer in the same bare loop: what its trainer does per step, minus the trainer."""
    import torch

    from gptcli.model import GPT
    from gptcli.optim import adamw

    try:
        from gptcli.train import gradient_norm  # the trainer's divergence check, every step
    except ImportError:  # moved: the same work, a norm over every gradient

        def gradient_norm(model: GPT, clip: float | None) -> float:
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))

    torch.manual_seed(123)
    model = GPT(config).to(device).train()
    optimizer = adamw(model.parameters(), lr=4e-4, weight_decay=0.1)
    forward = torch.compile(model) if compile_model else model

    def step(x: Any, y: Any) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = forward(x, targets=y)
        loss.backward()
        gradient_norm(model, None)
        optimizer.step()
        return loss.item()

    return step


def interleaved_rates(steps: dict[str, Callable[[Any, Any], float]], batches: list[tuple[Any, Any]],
                      rounds: int, per_round: int, tokens_per_step: int) -> dict[str, list[float]]:
    """Tokens/s of each step function over `rounds` rounds of `per_round` steps, taking turns."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for i in range(per_round):
                step(*batches[i % len(batches)])
            rates[name].append(per_round * tokens_per_step / (time.perf_counter() - started))
    return rates


def warmed_steps(config: GPTConfig, device: str, compile_model: bool, batches: list[tuple[Any, Any]],
                 info: dict[str, Any]) -> dict[str, Callable[[Any, Any], float]]:
    """Both step functions, run 3 times each (compilation, allocator); the seconds that took in `info`."""
    steps = {"nanoGPT": nanogpt_step(config, device, compile_model),
             "gptcli model, bare loop": gptcli_step(config, device, compile_model)}
    for name, step in steps.items():
        started = time.perf_counter()
        for i in range(3):
            step(*batches[i % len(batches)])
        info[f"{name} warm-up s"] = round(time.perf_counter() - started, 1)
    return steps


def cmd_nanogpt(args: argparse.Namespace) -> int:
    """nanoGPT's compiled bf16 step and gptcli's model in the same loop, same shapes, interleaved."""
    from gptcli.config import get_preset

    shape = shapes(args.quick)
    config = get_preset(shape.preset).replace(context_length=shape.context)
    result = Result("nanogpt", args.json, info=device_info(args.device))
    compile_model = not args.no_compile
    batches = random_batches(config, shape.batch, args.device)
    try:
        steps = warmed_steps(config, args.device, compile_model, batches, result.info)
    except Exception as exc:  # torch.compile needs triton and a C compiler: measure eager, and say so
        if not compile_model:
            raise
        result.check("torch.compile of nanoGPT and gptcli's model", False, f"{type(exc).__name__}: {str(exc)[:300]}")
        compile_model = False
        steps = warmed_steps(config, args.device, compile_model, batches, result.info)
    result.write()  # the warm-up (compilation) times, should the timed rounds be cut off
    rates = interleaved_rates(steps, batches, shape.reps + 2, 5, shape.batch * shape.context)
    suffix = f"{shape.preset} T{shape.context} b{shape.batch} bf16{' compile' if compile_model else ''}"
    for name, values in rates.items():
        rate = statistics.median(values)
        row = {"case": f"{name} {suffix}", "tokens_per_second": round(rate, 1),
               **mfu(rate, config, result.info, "bf16"), "range": [round(min(values), 1), round(max(values), 1)]}
        result.measure(row)
    ratio = statistics.median(rates["gptcli model, bare loop"]) / statistics.median(rates["nanoGPT"])
    result.info["gptcli_bare_over_nanogpt"] = round(ratio, 3)
    result.check("gptcli model / nanoGPT (same loop)", ratio > 0.8, round(ratio, 3), "> 0.8", strict=False)
    result.write()
    return 0 if result.passed() else 1


# --- sampling -----------------------------------------------------------------------------------


def decode_rate(model: GPT, prompts: list[list[int]], batch_size: int, tokens: int, reps: int, device: str) -> float:
    """Median tokens/s of greedy decoding of every prompt (`batch_size` rows at a time), never stopping early."""
    from gptcli.batched import decode_batch
    from gptcli.generate import DecodeSettings

    settings = DecodeSettings(max_new_tokens=tokens, stop_at_eos=False)
    list(decode_batch(model, prompts, DecodeSettings(max_new_tokens=4, stop_at_eos=False), batch_size=batch_size))
    rates = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        events = decode_batch(model, prompts, settings, batch_size=batch_size)
        count = sum(len(e.generation.token_ids) for e in events if e.generation is not None)
        sync(device)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def decode_bound(config: GPTConfig, dtype: str, info: dict[str, Any]) -> float | None:
    """Tokens/s of one row if every weight that multiplies is read once per token at full bandwidth."""
    peaks = info.get("peaks")
    if not peaks:
        return None
    size = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5 + 4 / 32}[dtype]  # int4: + bf16 scale, offset
    return peaks["hbm_gbps"] * 1e9 / (matmul_params(config) * size)


def cmd_sample(args: argparse.Namespace) -> int:
    """What `gptcli sample --dtype D --batch-size B` runs (its precision rule, the model loaded and quantized
    as it loads it, gptcli.batched.decode_batch), timed without start-up and loading; batch 1 and 32."""
    from gptcli.runtime import resolve_precision
    from gptcli.tokenizer import encode, get_tokenizer

    shape = shapes(args.quick)
    result = Result("sample", args.json, info=device_info(args.device))
    prompt = encode(get_tokenizer(), PROMPT)
    for dtype in ("fp32", "bf16", "int8", "int4"):  # int4 off CPU: the dequantizing path (correct, not fast)
        precision, _ = resolve_precision(dtype, args.device)
        result.check(f"sample --dtype {dtype}: runs {dtype}", precision == dtype, precision, dtype)
        model = load(args.model, args.device, precision)
        base = None
        for batch in (1, 32):
            rate = decode_rate(model, [prompt] * batch, batch, shape.decode_tokens, shape.reps, args.device)
            base = base or rate
            row: dict[str, Any] = {"case": f"sample {shape.preset} {dtype} batch {batch}",
                                   "tokens_per_second": round(rate, 1), "over_batch_1": round(rate / base, 2)}
            bound = decode_bound(model.config, dtype, result.info)
            if batch == 1 and bound:
                row["of_bandwidth_bound"] = round(rate / bound, 3)
            result.measure(row)
        del model
    result.write()
    return 0 if result.passed() else 1


# --- agreement with the CPU ---------------------------------------------------------------------


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (per-element ratios blow up where logits cross zero)."""
    got = got.detach().float().cpu()
    return float((got - ref).abs().max() / ref.abs().max())


def check_logits(result: Result, args: argparse.Namespace, ref_model: GPT, tokens: torch.Tensor) -> None:
    import torch

    with torch.inference_mode():
        ref = ref_model(tokens)
        ref_int8 = load(args.model, "cpu", "int8")(tokens)
        cases = (("fp32", ref, FP32_TOL), ("bf16", ref, BF16_TOL), ("int8", ref, INT8_TOL),
                 ("int8", ref_int8, FP32_TOL))
        for dtype, want, tol in cases:
            got = load(args.model, args.device, dtype)(tokens.to(args.device))
            against = "cpu int8" if want is ref_int8 else "cpu fp32"
            err = rel_error(got, want)
            result.check(f"logits {args.device} {dtype} vs {against}", err <= tol, f"{err:.2e}", tol)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where `a` and `b` differ (the shorter's length if one is a prefix), or None."""
    shorter = min(len(a), len(b))
    return next((i for i in range(shorter) if a[i] != b[i]), None if len(a) == len(b) else shorter)


def tie_gap(model: GPT, prefix: list[int], want: int, got: int) -> float:
    """How far apart (relative to the largest |logit|) `model` puts tokens `want` and `got` after `prefix`."""
    import torch

    device = model.tok_emb.weight.device
    with torch.inference_mode():
        logits = model(torch.tensor([prefix], device=device))[0, -1].float()
    return float((logits[want] - logits[got]).abs() / logits.abs().max())


def compare_tokens(result: Result, name: str, judge: GPT, prompt: list[int], want: list[int], got: list[int],
                   strict: bool = True) -> None:
    """Equal greedy tokens; where they part, a near-tie of the top two logits (under `judge`) is rounding, not a bug."""
    i = first_difference(want, got)
    if i is None:
        result.check(name, True, f"{len(want)} tokens equal", strict=strict)
        return
    gap = tie_gap(judge, prompt + want[:i], want[i], got[i]) if i < min(len(want), len(got)) else math.inf
    note = f"first differs at token {i}; logit gap {gap:.1e} of max"
    result.check(name, gap <= TIE_TOL, "near-tie" if gap <= TIE_TOL else "DIFFERENT", f"gap <= {TIE_TOL}", note, strict)


def check_greedy(result: Result, args: argparse.Namespace, ref_model: GPT) -> None:
    from gptcli.generate import generate
    from gptcli.tokenizer import encode, get_tokenizer

    prompt = encode(get_tokenizer(), PROMPT)
    want = generate(ref_model, prompt, max_new_tokens=20, stop_at_eos=False)[0]
    model = load(args.model, args.device, "fp32")
    got = generate(model, prompt, max_new_tokens=20, stop_at_eos=False)[0]
    compare_tokens(result, f"greedy 20 tokens {args.device} fp32 vs cpu fp32", ref_model, prompt, want, got)
    for dtype in ("fp32", "bf16"):
        model = model if dtype == "fp32" else load(args.model, args.device, dtype)
        check_batched(result, args, model, dtype)


def check_batched(result: Result, args: argparse.Namespace, model: GPT, dtype: str) -> None:
    """`sample --batch-size`: "each row gives the same tokens as alone" (its help), on this device."""
    from gptcli.batched import decode_batch
    from gptcli.generate import DecodeSettings

    prompts = prompt_ids(8, model.config.context_length // 2)
    settings = DecodeSettings(max_new_tokens=20, stop_at_eos=False)

    def tokens(rows: list[list[int]], size: int) -> dict[int, list[int]]:
        return {e.row: e.generation.token_ids for e in decode_batch(model, rows, settings, batch_size=size)
                if e.generation is not None}

    together = tokens(prompts, len(prompts))
    alone = [tokens([prompt], 1)[0] for prompt in prompts]
    name = f"greedy {args.device} {dtype}: batch {len(prompts)} rows vs each alone"
    differ = [row for row in range(len(prompts)) if alone[row] != together[row]]
    if not differ:
        result.check(name, True, f"all {len(prompts)} rows equal", strict=dtype == "fp32")
        return
    row = differ[0]
    compare_tokens(result, f"{name} (row {row}; {len(differ)} differ)", model, prompts[row], alone[row],
                   together[row], strict=dtype == "fp32")


def check_training(result: Result, args: argparse.Namespace) -> None:
    """Eight steps of the tiny preset without dropout, at a learning rate that moves the loss (so that
    differences in the updates show): the losses on the device against the CPU's."""
    from gptcli.config import get_preset

    config = get_preset("tiny").replace(context_length=64, drop_rate=0.0)
    corpus = ensure_corpus(args.scratch, 4000)

    def losses(device: Device, precision: Precision) -> list[float]:
        settings = train_settings(args, corpus, fresh_path(args.scratch, "check-"), config, 8, 4, precision,
                                  lr=3e-3, device=device)
        return run_training(settings).losses

    ref = losses("cpu", "fp32")
    cases: list[tuple[Precision, float]] = [("fp32", LOSS_TOL), ("bf16", BF16_LOSS_TOL)]
    for precision, tol in cases:
        got = losses(args.device, precision)
        diff = max(abs(a - b) for a, b in zip(ref, got, strict=True)) if len(got) == len(ref) else math.inf
        result.check(f"train tiny 8 steps {args.device} {precision} vs cpu fp32 losses", diff <= tol,
                     f"max diff {diff:.2e}", tol, f"loss {ref[0]:.3f} -> {ref[-1]:.4f} (cpu), {got[-1]:.4f}")


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    result = Result("check", args.json, info=device_info(args.device))
    ref_model = load(args.model, "cpu", "fp32")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ref_model.config.vocab_size, (2, min(128, ref_model.config.context_length)), generator=g)
    check_logits(result, args, ref_model, tokens)
    check_greedy(result, args, ref_model)
    check_training(result, args)
    result.write()
    return 0 if result.passed() else 1


# --- the command line itself --------------------------------------------------------------------


def gptcli_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gptcli", *args], capture_output=True, text=True, timeout=timeout)


def cli_train(result: Result, args: argparse.Namespace) -> None:
    shape = shapes(args.quick)
    corpus = ensure_corpus(args.scratch, int((2 * shape.batch + 8) * shape.context / 0.85))
    out = fresh_path(args.scratch, "cli-")
    started = time.perf_counter()
    run = gptcli_cli(["train", str(corpus), "--preset", shape.preset, "--context-length", str(shape.context),
                      "--batch-size", str(shape.batch), "--max-steps", "2", "--eval-freq", "1000000", "--eval-iter",
                      "1", "--sample-tokens", "0", "--no-plots", "--json", "--device", args.device, "--precision",
                      "bf16", "--out", str(out)], timeout=240)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()] if run.returncode == 0 else []
    ok = run.returncode == 0 and bool(lines) and all(math.isfinite(x["val_loss"]) for x in lines)
    ok = ok and (out / "model.safetensors").is_file()
    result.check("gptcli train --json --precision bf16 (2 steps)", ok,
                 f"exit {run.returncode}, {len(lines)} JSON lines",
                 note=f"{seconds:.1f} s" if ok else run.stderr.strip()[-300:])


def cli_sample(result: Result, args: argparse.Namespace) -> None:
    for dtype in ("bf16", "int8"):
        started = time.perf_counter()
        run = gptcli_cli(["sample", PROMPT, "-m", str(args.model), "--device", args.device, "--dtype", dtype, "-n", "8",
                          "--num-samples", "32", "--batch-size", "32", "--no-stop-at-eos", "--json", "--seed", "1"],
                         timeout=180)
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()] if run.returncode == 0 else []
        ok = len(rows) == 32 and all(r["dtype"] == dtype and len(r["token_ids"]) == 8 for r in rows)
        note = f"{seconds:.1f} s with start-up and loading" if ok else run.stderr.strip()[-300:]
        result.check(f"gptcli sample --dtype {dtype} --num-samples 32 --json", ok,
                     f"exit {run.returncode}, {len(rows)} rows", note=note)


def cmd_cli(args: argparse.Namespace) -> int:
    result = Result("cli", args.json, info=device_info(args.device))
    cli_train(result, args)
    cli_sample(result, args)
    result.write()
    return 0 if result.passed() else 1


# --- report -------------------------------------------------------------------------------------


def junit_summary(logs: Path) -> dict[str, Any]:
    """Counts, failed tests and skip reasons over the shards' junit files."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], set()
    for path in sorted(logs.glob("junit-*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
                skipped.add((outcome.get("message") or "")[:120])
            else:
                counts["failed"] += 1
                message = (outcome.get("message") or "").strip().splitlines()
                failed.append(f"{test_id}: {message[0][:160] if message else outcome.tag}")
    return {**counts, "failed_tests": failed, "skip_reasons": sorted(skipped)}


def read_parts(logs: Path) -> list[dict[str, Any]]:
    parts = []
    for line in (logs / "parts.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        part: dict[str, Any] = {"name": name, "rc": rc, "seconds": int(seconds)}
        path = logs / f"{name}.json"
        if path.is_file():
            part.update(json.loads(path.read_text()))
        if name == "tests":
            part["tests"] = junit_summary(logs)
        part["ok"] = rc == "0" and all(c["ok"] or not c["strict"] for c in part.get("checks", []))
        parts.append(part)
    return parts


def derived(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gptcli's training loop (the compiled bf16 burst) against nanoGPT's step and against its own model
    in the same bare loop (the trainer's overhead), all compiled, same GPU and shapes."""
    rows = {m["case"]: m for p in parts for m in p.get("measurements", [])}

    def find(prefix: str, suffix: str) -> dict[str, Any] | None:
        return next((m for c, m in rows.items() if c.startswith(prefix) and c.endswith(suffix)), None)

    train = find("train", "bf16 compile")
    out = []
    for name, other in (("nanoGPT step", find("nanoGPT", "compile")),
                        ("gptcli model in a bare loop", find("gptcli model", "compile"))):
        if train and other:
            ratio = train["tokens_per_second"] / other["tokens_per_second"]
            out.append({"case": f"gptcli train (bf16 compile) / {name}", "ratio": round(ratio, 3)})
    return out


def table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def measurement_cells(m: dict[str, Any]) -> tuple[str, ...]:
    rate = f"{m['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in m else f"x{m['ratio']:.2f}"
    if m.get("mfu") is not None:
        extra = f"MFU {m['mfu']:.1%} of {m['peak']}, {m['tflops']:g} TFLOP/s"
    elif "of_bandwidth_bound" in m:
        extra = f"{m['of_bandwidth_bound']:.1%} of the bandwidth bound"
    elif "over_batch_1" in m:
        extra = f"x{m['over_batch_1']:.2f} batch 1"
    else:
        extra = m.get("peak", "")
    return m["case"], rate, extra


def print_report(parts: list[dict[str, Any]], extra: list[dict[str, Any]], device: dict[str, Any]) -> None:
    print(f"\ngptcli GPU check: {device.get('gpu', device.get('device'))}, torch {device.get('torch')}, "
          f"CUDA {device.get('cuda')}")
    part_rows = [(p["name"], part_status(p), f"{p['seconds']}s", tests_cell(p)) for p in parts]
    print("\n" + table(part_rows, ("part", "status", "time", "")))
    measured = [m for p in parts for m in p.get("measurements", [])] + extra
    if measured:
        print("\n" + table([measurement_cells(m) for m in measured], ("case", "speed", "")))
    checks = [c for p in parts for c in p.get("checks", [])]
    if checks:
        rows = [(c["name"], "ok" if c["ok"] else ("FAIL" if c["strict"] else "warn"), str(c["value"]),
                 "" if c["limit"] is None else str(c["limit"])) for c in checks]
        print("\n" + table(rows, ("check", "", "value", "limit")))
        for c in checks:
            if not c["ok"] and c["note"]:
                print(f"  {c['name']}: {c['note']}")


def part_status(part: dict[str, Any]) -> str:
    if part["ok"]:
        return "ok"
    rc = part["rc"]
    if rc in ("124", "137"):
        return f"TIMED OUT (rc {rc})"
    return {"skipped": "SKIPPED (no time left)", "missing": "NOT RUN (pytest missing)"}.get(rc, f"FAIL (rc {rc})")


def tests_cell(part: dict[str, Any]) -> str:
    t = part.get("tests")
    if not t:
        return ""
    return f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"


def cmd_report(args: argparse.Namespace) -> int:
    logs = Path(args.logs)
    parts = read_parts(logs)
    device = json.loads((logs / "deps.json").read_text())["info"] if (logs / "deps.json").is_file() else {}
    extra = derived(parts)
    print_report(parts, extra, device)
    for p in parts:
        for failed in p.get("tests", {}).get("failed_tests", []):
            print(f"  failed: {failed}")
    ok = all(p["ok"] for p in parts)
    report = {"ok": ok, "device": device, "parts": parts, "derived": extra}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}; results in {args.out}, logs in {logs}")
    return 0 if ok else 1


# --- pytest plugin: test shards -----------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep shard i of n (GPU_CHECK_SHARD=i/n) of the collected tests, round robin."""
    shard = os.environ.get("GPU_CHECK_SHARD")
    if not shard:
        return
    index, count = map(int, shard.split("/"))
    keep = items[index::count]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


# --- command line -------------------------------------------------------------------------------


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "deps": cmd_deps, "model": cmd_model, "train": cmd_train, "nanogpt": cmd_nanogpt, "sample": cmd_sample,
    "check": cmd_check, "cli": cmd_cli, "report": cmd_report,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: try the script itself")
    common.add_argument("--quick", action="store_true", help="tiny shapes (the tiny preset, context 64)")
    common.add_argument("--scratch", type=Path, default=Path("."), help="directory for corpora, runs and models")
    common.add_argument("--json", help="write the part's result here")
    common.add_argument("--model", type=Path, help="gptcli model file (model: where to write it)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name, parents=[common])
        if name == "train":
            p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
            p.add_argument("--compile", action="store_true")
        if name == "nanogpt":
            p.add_argument("--no-compile", action="store_true")
        if name == "report":
            p.add_argument("--logs", required=True)
            p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.python_name = sys.executable
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and args.command != "report":
        os.environ.setdefault("GPTCLI_CPU_BF16", "1")  # run the bf16 paths on a CPU too (slowly)
    args.scratch.mkdir(parents=True, exist_ok=True)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
