"""gptcli's benchmark suite: training, memory, evaluation, generation, `prepare` and start-up time,
against the chapter's code, Hugging Face transformers (when installed) and a nanoGPT-style model.

    python benchmarks/run.py --quick               # a few minutes; one table
    python benchmarks/run.py                       # the full run (about half an hour on 2 cores)
    python benchmarks/run.py --quick --json out.json --threads 2

Method. Every implementation of a case is measured in one process, interleaved (A, B, C, A, B,
C ...) after a warm-up, so slow drift (thermal, other processes) hits all of them alike; the table
gives the median and the range (min-max) over the repetitions and the ratio of medians to the
baseline (the chapter's code). Peak memory is the exception: each implementation runs a few
training steps in its own fresh process and reports its peak resident set (ru_maxrss).

Implementations:
- chapter: benchmarks/chapter.py, the chapter's GPTModel (hand-written LayerNorm, GELU and masked
  attention), `calc_loss_batch`, `torch.optim.AdamW` with its defaults, and the uncached
  `generate_text`;
- gptcli: its public API, `gptcli.model.GPT` trained as `gptcli train` trains it (the loss from
  `model(inputs, targets=targets)`, `gptcli.optim.adamw`, `zero_grad(set_to_none=True)`, the loss
  read back every step), `gptcli.generate.generate` (KV-cached greedy decoding) and
  `gptcli.evaluate.sliding_window_loss` (what `gptcli eval` runs);
- hf: transformers' GPT2LMHeadModel with its default attention (SDPA) and the optimizer its Trainer
  uses by default (fused AdamW on torch >= 2.8, weight decay off for biases and LayerNorms), and
  `generate` with its default (dynamic) cache;
- nanogpt: benchmarks/nanogpt.py, nanoGPT's model and `configure_optimizers` (fused AdamW on CUDA
  only, so the per-tensor loop on CPU).

Shapes. Training: GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257) at context 256 with the
chapter's dropout 0.1 and untied head (163M parameters), random token batches. Generation and
evaluation: GPT-2 124M as OpenAI released it (context 1024, qkv bias, tied head), the same random
weights in every implementation, prompt "Every effort moves you", greedy, never stopping early.

Figures of merit. MFU: training FLOP/s over the matmul peak this run measures (a large square
matmul, best of several), with FLOPs per token = 6 N + 12 L C T (N: parameters that multiply,
the embeddings excluded; L layers, C width, T context). Decoding: tokens/s over the bound set by
reading every weight once per token at the memory read bandwidth this run measures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"
from gptcli.assets import VERDICT  # noqa: E402

LR, WEIGHT_DECAY = 4e-4, 0.1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- settings -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run measures; --quick and --tiny shrink it."""

    train_batches: tuple[int, ...] = (2, 8)
    train_precisions: tuple[str, ...] = ("fp32", "bf16")
    train_reps: int = 5
    train_warmup: int = 1
    memory_batches: tuple[int, ...] = (2, 8)
    memory_steps: int = 3
    memory_reps: int = 3  # fresh processes per implementation (A, B, C, A, B, C ...); the peak varies by ~10%
    memory_all: bool = True  # also hf and nanogpt (else the chapter and gptcli only)
    gen_tokens: tuple[int, ...] = (50, 200)
    gen_reps: int = 5
    gen_reps_long: int = 5  # repetitions for the longest generation (the chapter's takes about a minute)
    eval_windows: int = 4
    eval_reps: int = 5
    help_reps: int = 7
    prepare_mb: int = 100
    peak_size: int = 2048
    bandwidth_mb: int = 512
    batch_sizes: tuple[int, ...] = (1, 4, 16, 32)
    batch_prompts: int = 64  # the-verdict's first non-empty lines
    batch_tokens: int = 100
    batch_reps: int = 2
    dtype_tokens: int = 200
    dtype_reps: int = 3
    dtype_eval_tokens: int = 2049  # int8 vs fp32 perplexity on the-verdict's first tokens
    tiny: bool = False
    notes: list[str] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        return Plan(train_batches=(2,), train_reps=1, memory_batches=(2,), memory_steps=2, memory_reps=1,
                    memory_all=False, gen_tokens=(8,), gen_reps=1, gen_reps_long=1, eval_windows=2, eval_reps=1,
                    help_reps=1, prepare_mb=0, peak_size=256, bandwidth_mb=32, batch_sizes=(1, 4), batch_prompts=6,
                    batch_tokens=6, batch_reps=1, dtype_tokens=8, dtype_reps=1, dtype_eval_tokens=200, tiny=True,
                    notes=["--tiny: tiny shapes, one repetition: checks that the suite runs, no figure means anything"])
    if args.quick:
        return Plan(train_batches=(2,), train_reps=3, memory_batches=(2,), memory_reps=2, memory_all=False,
                    gen_tokens=(50, 200),
                    gen_reps=3, gen_reps_long=1, eval_windows=2, eval_reps=3, help_reps=5, prepare_mb=20,
                    batch_reps=1, dtype_reps=2,
                    notes=["--quick: 3 repetitions (1 for 200-token generation), batch 2 only, peak memory of the "
                           "chapter and gptcli only (2 rounds), 20 MB for prepare"])
    return Plan()


def train_config(tiny: bool):
    from gptcli.config import get_preset

    if tiny:
        return get_preset("tiny").replace(context_length=64)
    return get_preset("124M").replace(context_length=256)


def gpt2_config(tiny: bool):
    from gptcli.config import GPTConfig

    if tiny:
        return GPTConfig(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True,
                         tie_weights=True)
    return GPTConfig(qkv_bias=True, tie_weights=True, drop_rate=0.0)


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: every block's linear layers and the head."""
    c = config.emb_dim
    return config.n_layers * 12 * c * c + config.vocab_size * c


def train_flops_per_token(config) -> float:
    return 6 * matmul_params(config) + 12 * config.n_layers * config.emb_dim * config.context_length


def weight_bytes(config, dtype: torch.dtype) -> int:
    element = torch.finfo(dtype).bits // 8
    return matmul_params(config) * element


# --- measuring ------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `reps` rounds of A, B, C ...; each call returns the work it
    did (tokens), the result is work per second for each call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            gc.collect()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name, fn in fns.items():
            started = time.perf_counter()
            work = fn()
            rates[name].append(work / (time.perf_counter() - started))
            gc.collect()
        log(f"    rep {rep + 1}/{reps}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()))
    return rates


def recording(results: dict[str, Any], name: str, fn: Callable[[], Any], work: float) -> Callable[[], float]:
    """A call for `interleaved`: runs fn, keeps its result in results[name], returns `work`."""

    def run() -> float:
        results[name] = fn()
        return work

    return run


def matmul_peak(dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """Best GFLOP/s over a few large matmuls: a square one and the model's widest layers."""
    best = 0.0
    shapes = ((size, size, size), (size, size * 3 // 8, size * 3 // 2), (size // 4, size * 3 // 2, size * 3 // 8))
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        a @ b
        for _ in range(reps):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e9)
    return best


def read_bandwidth(megabytes: int, reps: int = 5) -> float:
    """Best GB/s of reading a float32 tensor of `megabytes` (a sum, which the reads bound)."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident set. On Linux VmHWM: ru_maxrss would also count the parent's
    resident set at the moment it spawned this process (Linux carries it over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# --- training implementations ---------------------------------------------------------------------


def build_trainer(name: str, config) -> Callable[[torch.Tensor, torch.Tensor, str], float]:
    """One training step of implementation `name`: (inputs, targets, precision) -> loss."""
    torch.manual_seed(123)
    if name == "chapter":
        from benchmarks.chapter import GPTModel, calc_loss_batch, config_dict

        model = GPTModel(config_dict(config)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

        def step(x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
            optimizer.zero_grad()
            with precision_context(precision):
                loss = calc_loss_batch(x, y, model, "cpu")
            loss.backward()
            optimizer.step()
            return loss.item()

        return step
    if name == "gptcli":
        from gptcli.model import GPT
        from gptcli.optim import adamw

        model = GPT(config).train()
        optimizer = adamw(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

        def step(x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                loss = model(x, targets=y)
            loss.backward()
            optimizer.step()
            return loss.item()

        return step
    if name == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
            n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=config.drop_rate,
            embd_pdrop=config.drop_rate, attn_pdrop=config.drop_rate, tie_word_embeddings=config.tie_weights,
        )
        model = GPT2LMHeadModel(hf_config).train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        fused = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)  # Trainer's default
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR, **({"fused": True} if fused else {}),
        )

        def step(x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                logits = model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            optimizer.step()
            return loss.item()

        return step
    if name == "nanogpt":
        from benchmarks.nanogpt import NanoConfig, NanoGPT

        model = NanoGPT(NanoConfig(
            block_size=config.context_length, vocab_size=config.vocab_size, n_layer=config.n_layers,
            n_head=config.n_heads, n_embd=config.emb_dim, dropout=config.drop_rate,
        )).train()
        optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, (0.9, 0.999), "cpu")

        def step(x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            return loss.item()

        return step
    raise ValueError(f"unknown implementation {name!r}")


def train_impls() -> list[str]:
    names = ["chapter", "gptcli"]
    if have_transformers():
        names.append("hf")
    names.append("nanogpt")
    return names


def batch(config, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.context_length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# --- the cases ------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    impl: str
    values: list[float]
    unit: str
    higher_is_better: bool = True
    ratio: float | None = None  # median over the baseline's median
    extra: str = ""  # MFU, share of the decoding bound
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "impl": self.impl, "median": self.median, "min": min(self.values),
                "max": max(self.values), "values": self.values, "unit": self.unit, "ratio": self.ratio,
                "extra": self.extra, "note": self.note}


@dataclass
class Target:
    name: str
    value: float | None
    goal: float
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.name, "value": self.value, "goal": self.goal,
                "at_most": self.at_most, "met": self.met}


def generators(models: dict[str, Any], prompt: torch.Tensor, n: int) -> dict[str, Callable[[], list[int]]]:
    """Greedy decoding of `n` tokens after `prompt` by each implementation in `models`, as calls that
    return the new tokens: the chapter's loop, gptcli's `generate`, and Hugging Face's when loaded."""
    from benchmarks.chapter import generate_text
    from gptcli.generate import generate as gptcli_generate

    def gptcli_fn(model) -> Callable[[], list[int]]:
        return lambda: gptcli_generate(model, prompt, max_new_tokens=n, stop_at_eos=False)[0]

    def hf_fn(model) -> Callable[[], list[int]]:
        def run() -> list[int]:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
            return out[0, prompt.shape[1]:].tolist()
        return run

    def chapter_run() -> list[int]:
        context = models["config"].context_length
        return generate_text(models["chapter"], prompt, n, context)[0, prompt.shape[1]:].tolist()

    fns = {"chapter": chapter_run, "gptcli": gptcli_fn(models["gptcli"])}
    if "hf" in models:
        fns["hf"] = hf_fn(models["hf"])
    fns["gptcli bf16"] = gptcli_fn(models["gptcli bf16"])
    if "hf bf16" in models:
        fns["hf bf16"] = hf_fn(models["hf bf16"])
    return fns


class Suite:
    def __init__(self, plan: Plan, threads: int | None) -> None:
        self.plan = plan
        self.threads = threads
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.peaks: dict[str, float] = {}
        self.notes: list[str] = list(plan.notes)
        self._train_rows: dict[tuple[str, int], dict[str, Row]] = {}

    def add(self, rows: list[Row], baseline: str | None) -> dict[str, Row]:
        by_name = {r.impl: r for r in rows}
        if baseline and baseline in by_name:
            base = by_name[baseline].median
            for r in rows:
                r.ratio = r.median / base if base else None
        self.rows.extend(rows)
        return by_name

    # -- machine ceilings
    def measure_peaks(self) -> None:
        log("machine: matmul peaks and read bandwidth")
        size = self.plan.peak_size
        self.peaks["fp32_gflops"] = matmul_peak(torch.float32, size)
        self.peaks["bf16_gflops"] = matmul_peak(torch.bfloat16, size)
        self.peaks["read_gbps"] = read_bandwidth(self.plan.bandwidth_mb)
        log(f"  fp32 {self.peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {self.peaks['bf16_gflops']:.0f} GFLOP/s, "
            f"read {self.peaks['read_gbps']:.1f} GB/s")

    # -- training throughput
    def training(self) -> None:
        config = train_config(self.plan.tiny)
        names = train_impls()
        log(f"training: {', '.join(names)}")
        trainers = {name: build_trainer(name, config) for name in names}
        flops = train_flops_per_token(config)
        for size in self.plan.train_batches:
            x, y = batch(config, size)
            for precision in self.plan.train_precisions:
                case = f"train {precision} b{size}"
                log(f"  {case}")
                losses: dict[str, float] = {}
                fns = {n: recording(losses, n, functools.partial(trainers[n], x, y, precision), x.numel())
                       for n in names}
                rates = interleaved(fns, self.plan.train_reps, self.plan.train_warmup)
                peak = self.peaks["bf16_gflops" if precision == "bf16" else "fp32_gflops"]
                rows = []
                for name in names:
                    mfu = statistics.median(rates[name]) * flops / 1e9 / peak
                    rows.append(Row(case, name, rates[name], "tokens/s", extra=f"MFU {mfu:.0%}",
                                    note=f"loss {losses[name]:.2f}"))
                self.add(rows, "chapter")
                self._train_rows[(precision, size)] = {r.impl: r for r in rows}
        del trainers
        gc.collect()

    def training_targets(self) -> None:
        for size in self.plan.train_batches:
            fp32 = self._train_rows.get(("fp32", size))
            bf16 = self._train_rows.get(("bf16", size))
            if fp32:
                chapter = fp32["chapter"].median
                self.targets.append(Target(f"train fp32 b{size}: gptcli / chapter", fp32["gptcli"].median / chapter,
                                           1.4))
                others = [fp32[n].median for n in ("hf", "nanogpt") if n in fp32]
                if others:
                    best = max(others)
                    self.targets.append(Target(f"train fp32 b{size}: gptcli / best of hf, nanogpt",
                                               fp32["gptcli"].median / best, 1.15))
            if fp32 and bf16:
                self.targets.append(Target(f"train bf16 b{size}: gptcli bf16 / chapter fp32",
                                           bf16["gptcli"].median / fp32["chapter"].median, 2.2))

    # -- peak memory, one process per implementation
    def memory(self) -> None:
        names = train_impls() if self.plan.memory_all else ["chapter", "gptcli"]
        for size in self.plan.memory_batches:
            case = f"peak memory fp32 b{size}"
            log(f"  {case}: {', '.join(names)} (one process each, {self.plan.memory_reps} rounds)")
            peaks: dict[str, list[float]] = {name: [] for name in names}
            before: dict[str, float] = {}
            for _ in range(self.plan.memory_reps):
                for name in names:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name, "--batch",
                           str(size), "--steps", str(self.plan.memory_steps)]
                    if self.plan.tiny:
                        cmd.append("--tiny")
                    if self.threads:
                        cmd += ["--threads", str(self.threads)]
                    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if result.returncode != 0:
                        self.notes.append(f"memory {name} b{size} failed: {result.stderr.strip()[-300:]}")
                        continue
                    data = json.loads(result.stdout.strip().splitlines()[-1])
                    peaks[name].append(data["peak_mb"])
                    before[name] = data["before_mb"]
                    log(f"    {name}: {data['peak_mb']:.0f} MB")
            rows = [Row(case, name, values, "MB", higher_is_better=False,
                        note=f"{before[name]:.0f} MB after import; {self.plan.memory_steps} steps")
                    for name, values in peaks.items() if values]
            by_name = self.add(rows, "chapter")
            if "chapter" in by_name and "gptcli" in by_name:
                self.targets.append(Target(f"peak memory b{size}: gptcli / chapter", by_name["gptcli"].ratio, 0.8,
                                           at_most=True))

    # -- generation and evaluation share the GPT-2 124M weights
    def _inference_models(self) -> dict[str, Any]:
        from benchmarks.chapter import GPTModel, config_dict, from_gptcli_state_dict
        from gptcli.model import GPT

        config = gpt2_config(self.plan.tiny)
        torch.manual_seed(123)
        model = GPT(config).eval()
        with torch.no_grad():  # GPT-2-like scales, so the logits are not degenerate
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        state = model.state_dict()
        chapter = GPTModel(config_dict(config)).eval()
        chapter_state = chapter.state_dict()  # keeps its attention-mask buffers
        chapter_state.update(from_gptcli_state_dict(state, config.n_layers))
        chapter.load_state_dict(chapter_state)
        bf16 = GPT(config).eval()
        bf16.load_state_dict(state)
        models: dict[str, Any] = {"config": config, "chapter": chapter, "gptcli": model,
                                  "gptcli bf16": bf16.to(torch.bfloat16)}
        if have_transformers():
            hf = hf_gpt2(config, state)
            models["hf"] = hf
            models["hf bf16"] = hf_gpt2(config, state).to(torch.bfloat16)
        return models

    def generation(self, models: dict[str, Any]) -> None:
        config = models["config"]
        prompt = torch.tensor([PROMPT])
        for fn in generators(models, prompt, 4).values():  # warm-up: kernels, allocator, HF's generation set-up
            fn()
        read = self.peaks.get("read_gbps")
        for n in self.plan.gen_tokens:
            case = f"generate {n} tokens"
            fns = generators(models, prompt, n)
            outputs: dict[str, list[int]] = {}
            reps = self.plan.gen_reps_long if n == max(self.plan.gen_tokens) else self.plan.gen_reps
            log(f"  {case}: {', '.join(fns)} ({reps} repetitions)")
            rates = interleaved({name: recording(outputs, name, fn, n) for name, fn in fns.items()}, reps, 0)
            rows = []
            for name in fns:
                dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
                extra = ""
                if read:
                    bound = read * 1e9 / weight_bytes(config, dtype)
                    extra = f"{statistics.median(rates[name]) / bound:.0%} of {bound:.0f}/s bound"
                same = "" if name == "chapter" or name.endswith("bf16") else (
                    "same tokens as chapter" if outputs[name] == outputs["chapter"] else "TOKENS DIFFER from chapter")
                rows.append(Row(case, name, rates[name], "tokens/s", extra=extra, note=same))
            by_name = self.add(rows, "chapter")
            if n == max(self.plan.gen_tokens):
                g = by_name["gptcli"].median
                self.targets.append(Target(f"generate {n}: gptcli / chapter", g / by_name["chapter"].median, 15))
                if "hf" in by_name:
                    self.targets.append(Target(f"generate {n}: gptcli / hf (fp32)", g / by_name["hf"].median, 2))
                self.targets.append(Target(f"generate {n}: gptcli bf16 / gptcli fp32",
                                           by_name["gptcli bf16"].median / g, 1.5))

    def evaluation(self, models: dict[str, Any]) -> None:
        from benchmarks.chapter import calc_loss_batch
        from gptcli.evaluate import sliding_window_loss

        config = models["config"]
        ctx = config.context_length
        windows = self.plan.eval_windows
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, config.vocab_size, (windows * ctx + 1,), generator=g)
        x = tokens[:-1].view(windows, ctx)
        y = tokens[1:].view(windows, ctx)
        batch_size = 2
        losses: dict[str, float] = {}

        def chapter() -> float:
            total = 0.0
            with torch.no_grad():
                for i in range(0, windows, batch_size):
                    total += calc_loss_batch(x[i:i + batch_size], y[i:i + batch_size], models["chapter"], "cpu").item()
            losses["chapter"] = total / -(-windows // batch_size)
            return windows * ctx

        def gptcli(name: str) -> Callable[[], float]:
            def run() -> float:
                losses[name], count = sliding_window_loss(models[name], tokens.numpy(), batch_size=batch_size)
                return count
            return run

        case = f"eval (ctx {ctx}, batch {batch_size})"
        log(f"  {case}")
        rates = interleaved({"chapter": chapter, "gptcli": gptcli("gptcli"), "gptcli bf16": gptcli("gptcli bf16")},
                            self.plan.eval_reps, 1)
        flops = 2 * matmul_params(config) + 4 * config.n_layers * config.emb_dim * ctx
        rows = []
        for name, values in rates.items():
            peak = self.peaks["bf16_gflops" if name.endswith("bf16") else "fp32_gflops"]
            mfu = statistics.median(values) * flops / 1e9 / peak
            rows.append(Row(case, name, values, "tokens/s", extra=f"MFU {mfu:.0%}", note=f"loss {losses[name]:.3f}"))
        self.add(rows, "chapter")

    def inference(self) -> None:
        log("generation and evaluation")
        models = self._inference_models()
        self.evaluation(models)
        self.generation(models)
        del models
        gc.collect()

    # -- batched decoding (gptcli sample's rows) and the inference precisions
    def _decode_model(self):
        from gptcli.model import GPT

        torch.manual_seed(123)
        model = GPT(gpt2_config(self.plan.tiny)).eval()
        with torch.no_grad():  # GPT-2-like scales, so the logits are not degenerate
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        return model

    def batched(self) -> None:
        """Greedy decoding of the-verdict's first lines, `batch_tokens` each, at each batch size:
        aggregate tokens/s, and useful FLOP/s (2 per weight that multiplies, per token) against the
        fp32 matmul peak. Batch b decodes max(4 b, 4) of the prompts (up to all of them): the rate is
        steady once the batch is full, and batch 1 over all 64 would take minutes."""
        from gptcli.batched import decode_batch
        from gptcli.generate import DecodeSettings

        model = self._decode_model()
        config = model.config
        prompts = [p[: config.context_length // 2] for p in verdict_lines(self.plan.batch_prompts)]  # --tiny: ctx 128
        settings = DecodeSettings(max_new_tokens=self.plan.batch_tokens, stop_at_eos=False)
        outputs: dict[str, list[list[int]]] = {}

        def run(size: int, count: int) -> Callable[[], float]:
            def decode() -> float:
                rows = prompts[:count]
                done = {e.row: e.generation.token_ids for e in decode_batch(model, rows, settings, batch_size=size)
                        if e.generation is not None}
                outputs[f"batch {size}"] = [done[i] for i in range(len(rows))]
                return sum(len(t) for t in done.values())
            return decode

        fns = {f"batch {b}": run(b, min(len(prompts), max(4 * b, 4))) for b in self.plan.batch_sizes}
        case = f"batched greedy, {self.plan.batch_tokens} tokens/row"
        log(f"  {case}: {', '.join(fns)}")
        warm = DecodeSettings(max_new_tokens=2, stop_at_eos=False)
        list(decode_batch(model, prompts[:4], warm, batch_size=4))  # warm-up: kernels, allocator
        rates = interleaved(fns, self.plan.batch_reps, 0)
        # Useful work per generated token: its own step and its share of its row's prompt (the
        # prefill), 2 FLOPs per weight that multiplies, plus attention over the average context.
        avg_prompt = statistics.mean(len(p) for p in prompts)
        tokens_per_new = 1 + avg_prompt / self.plan.batch_tokens
        avg_context = avg_prompt + self.plan.batch_tokens / 2
        flops = tokens_per_new * (2 * matmul_params(config) + 4 * config.n_layers * config.emb_dim * avg_context)
        peak = self.peaks["fp32_gflops"]
        reference = outputs["batch 1"]
        rows = []
        for name, values in rates.items():
            gflops = statistics.median(values) * flops / 1e9
            same = outputs[name][: len(reference)] == reference  # the rows batch 1 decoded
            rows.append(Row(case, f"gptcli {name}", values, "tokens/s",
                            extra=f"{gflops:.0f} GFLOP/s = {gflops / peak:.0%} of fp32 peak",
                            note=("same tokens as batch 1" if same else "TOKENS DIFFER from batch 1")
                            + f"; load {os.getloadavg()[0]:.1f}"))
        by_name = self.add(rows, "gptcli batch 1")
        for b, goal in ((4, 3.0), (16, 6.0)):
            if f"gptcli batch {b}" in by_name:
                self.targets.append(Target(f"batched: batch {b} / batch 1", by_name[f"gptcli batch {b}"].ratio, goal))
        if "gptcli batch 32" in by_name:
            share = by_name["gptcli batch 32"].median * flops / 1e9 / peak
            self.targets.append(Target("batched: batch 32 useful FLOP/s / fp32 matmul peak", share, 0.5))

    def dtypes(self) -> None:
        """Single-stream greedy decoding in fp32, bf16 and int8, interleaved, and int8's perplexity
        against fp32's on the-verdict (the same random GPT-2 124M weights)."""
        import copy

        from gptcli.generate import generate as gptcli_generate
        from gptcli.quantize import quantize_model
        from gptcli.runtime import bf16_is_native

        fp32 = self._decode_model()
        models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
                  "int8": quantize_model(copy.deepcopy(fp32))}
        n = self.plan.dtype_tokens
        prompt = torch.tensor([PROMPT])

        def run(model) -> Callable[[], float]:
            return lambda: len(gptcli_generate(model, prompt, max_new_tokens=n, stop_at_eos=False)[0])

        case = f"decode {n} tokens by dtype"
        log(f"  {case}")
        rates = interleaved({name: run(m) for name, m in models.items()}, self.plan.dtype_reps, 1)
        config = fp32.config
        bytes_per = {"fp32": weight_bytes(config, torch.float32), "bf16": weight_bytes(config, torch.bfloat16),
                     "int8": matmul_params(config)}
        read = self.peaks.get("read_gbps")
        rows = []
        for name, values in rates.items():
            extra = ""
            if read:
                bound = read * 1e9 / bytes_per[name]
                extra = f"{statistics.median(values) / bound:.0%} of {bound:.0f}/s bound"
            rows.append(Row(case, f"gptcli {name}", values, "tokens/s", extra=extra,
                            note=f"load {os.getloadavg()[0]:.1f}"))
        by_name = self.add(rows, "gptcli fp32")
        self.targets.append(Target(f"decode {n}: int8 / fp32", by_name["gptcli int8"].ratio, 2.0))
        if bf16_is_native("cpu"):
            self.targets.append(Target(f"decode {n}: bf16 / fp32 (native bf16)", by_name["gptcli bf16"].ratio, 1.5))
        self._int8_perplexity(models)

    def _int8_perplexity(self, models: dict[str, Any]) -> None:
        from gptcli.evaluate import perplexity, sliding_window_loss

        tokens = verdict_tokens()[: self.plan.dtype_eval_tokens]
        ppl = {name: perplexity(sliding_window_loss(models[name], tokens, batch_size=2)[0])
               for name in ("fp32", "int8")}
        change = abs(ppl["int8"] - ppl["fp32"]) / ppl["fp32"]
        self.notes.append(f"int8 perplexity on the-verdict's first {len(tokens)} tokens (random 124M weights): "
                          f"{ppl['int8']:.2f} vs fp32 {ppl['fp32']:.2f} ({change:.3%} apart)")
        self.targets.append(Target("int8 perplexity: relative change vs fp32", change, 0.01, at_most=True))

    # -- start-up time of the CLI
    def startup(self) -> None:
        log("gptcli --help")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "gptcli --help": [sys.executable, "-m", "gptcli", "--help"],
            "gptcli sample --help": [sys.executable, "-m", "gptcli", "sample", "--help"],
        }
        rows = []
        for name, cmd in commands.items():
            times = []
            for _ in range(self.plan.help_reps):
                started = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True, env=env, cwd=ROOT)
                times.append(time.perf_counter() - started)
            rows.append(Row("start-up", name, times, "s", higher_is_better=False))
        probe = subprocess.run(
            [sys.executable, "-c", "import sys, gptcli.cli; print(int('torch' in sys.modules))"],
            capture_output=True, text=True, env=env, cwd=ROOT, check=False,
        )
        rows[1].note = "torch imported on the help path!" if probe.stdout.strip() == "1" else "no torch import"
        self.add(rows, None)
        for row in rows[1:]:
            self.targets.append(Target(f"{row.impl}: seconds", row.median, 0.3, at_most=True))

    # -- prepare against raw tiktoken (benchmarks/prepare_bench.py)
    def prepare(self) -> None:
        script = ROOT / "benchmarks" / "prepare_bench.py"
        if not self.plan.prepare_mb:
            return
        if not script.exists():
            self.notes.append("prepare: benchmarks/prepare_bench.py is missing; skipped")
            return
        log(f"prepare vs raw tiktoken ({self.plan.prepare_mb} MB)")
        cmd = [sys.executable, str(script), "--size-mb", str(self.plan.prepare_mb), "--json"]
        if self.threads:
            cmd += ["--workers", str(self.threads)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if result.returncode != 0:
            self.notes.append(f"prepare: skipped ({result.stderr.strip().splitlines()[-1:]})")
            return
        data = json.loads(result.stdout.strip().splitlines()[-1])
        case = f"prepare {data.get('corpus_mb', self.plan.prepare_mb):.0f} MB"
        rows = [Row(case, "tiktoken batch", [data["baseline_tokens_per_s"]], "tokens/s",
                    note=f"peak {data.get('baseline_peak_rss_mib') or 0:.0f} MB"),
                Row(case, "gptcli prepare", [data["prepare_tokens_per_s"]], "tokens/s",
                    note=f"peak {data.get('prepare_peak_rss_mib') or 0:.0f} MB; "
                         + ("same tokens" if data.get("same_tokens") else "TOKENS DIFFER"))]
        self.add(rows, "tiktoken batch")

    # -- report
    def table(self) -> str:
        header = ("case", "implementation", "median", "range", "unit", "vs base", "efficiency", "note")
        lines = []
        for r in self.rows:
            digits = 3 if r.unit == "s" else (0 if r.median >= 100 else 1)
            lines.append((
                r.case, r.impl, f"{r.median:.{digits}f}", f"{min(r.values):.{digits}f}-{max(r.values):.{digits}f}",
                r.unit, "" if r.ratio is None else f"{r.ratio:.2f}x", r.extra, r.note,
            ))
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        out = []

        def fmt(cols: tuple[str, ...]) -> str:
            parts = []
            for i, (c, w) in enumerate(zip(cols, widths, strict=True)):
                parts.append(c.rjust(w) if i in (2, 3, 5) else c.ljust(w))
            return "  ".join(parts).rstrip()

        out.append(fmt(header))
        out.append(fmt(tuple("-" * w for w in widths)))
        previous = None
        for line in lines:
            if previous is not None and line[0] != previous:
                out.append("")
            out.append(fmt(line if line[0] != previous else ("",) + line[1:]))
            previous = line[0]
        if self.targets:
            out.append("")
            out.append("targets")
            for t in self.targets:
                mark = {True: "met", False: "NOT MET", None: "n/a"}[t.met]
                sign = "<=" if t.at_most else ">="
                value = "n/a" if t.value is None else f"{t.value:.2f}"
                out.append(f"  {t.name:52} {value:>6}  (goal {sign} {t.goal:g})  {mark}")
        return "\n".join(out)

    def environment(self) -> dict[str, Any]:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        return {
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": load, "transformers": transformers_version(), "cpu_flags": cpu_flags(),
            "bf16_native": _bf16_native(),
        }


def verdict_tokens() -> list[int]:
    from gptcli.tokenizer import encode, get_tokenizer

    return encode(get_tokenizer(), VERDICT.read_text(encoding="utf-8"))


def verdict_lines(count: int) -> list[list[int]]:
    """The token ids of the-verdict's first `count` non-empty lines (repeated if it has fewer)."""
    from gptcli.tokenizer import encode, get_tokenizer

    tokenizer = get_tokenizer()
    lines = [line for line in VERDICT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [encode(tokenizer, lines[i % len(lines)]) for i in range(count)]


def cpu_flags() -> list[str]:
    """The CPU flags that matter to these kernels, as /proc/cpuinfo lists them."""
    from gptcli.runtime import cpu_flags as all_flags

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "bf16")
    return sorted(set(wanted) & all_flags())


def _bf16_native() -> bool:
    from gptcli.runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


# --- weights shared by the implementations ---------------------------------------------------------


def hf_gpt2(config, state: dict[str, torch.Tensor]):
    """transformers' GPT2LMHeadModel holding gptcli's (GPT-2-shaped) weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
    )).eval()
    hf.generation_config.eos_token_id = None  # never stop early, like the other implementations
    mapped = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
              "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
    for i in range(config.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        pairs = {"ln_1": "norm1", "ln_2": "norm2"}
        for h, g in pairs.items():
            mapped[dst + h + ".weight"] = state[src + g + ".weight"]
            mapped[dst + h + ".bias"] = state[src + g + ".bias"]
        linear = {"attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj"}
        for h, g in linear.items():
            mapped[dst + h + ".weight"] = state[src + g + ".weight"].t().contiguous()  # Conv1D is (in, out)
            mapped[dst + h + ".bias"] = state[src + g + ".bias"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith(".attn.bias")]
    if missing or unexpected:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    return hf


# --- child process: peak memory of a few training steps -------------------------------------------


def child_memory(name: str, size: int, steps: int, tiny: bool) -> None:
    before = peak_rss_mb()
    config = train_config(tiny)
    step = build_trainer(name, config)
    x, y = batch(config, size)
    for _ in range(steps):
        step(x, y, "fp32")
    print(json.dumps({"impl": name, "batch": size, "steps": steps, "before_mb": before, "peak_mb": peak_rss_mb()}))


# --- main -----------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases (a few minutes)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to check that the suite runs (seconds)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH as JSON")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    parser.add_argument("--only", default="train,memory,inference,batched,dtypes,prepare,startup",
                        help="comma-separated cases: train, memory, inference, batched, dtypes, prepare, startup "
                        "(default: all)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_cases(suite: Suite, only: set[str]) -> None:
    """The chosen cases, in a fixed order (startup first, before anything warms the caches)."""
    if "startup" in only:
        suite.startup()
    if "train" in only:
        suite.training()
        suite.training_targets()
    if "memory" in only:
        log("peak memory")
        suite.memory()
    if "inference" in only:
        suite.inference()
    if "batched" in only:
        log("batched decoding")
        suite.batched()
    if "dtypes" in only:
        log("decoding precisions")
        suite.dtypes()
    if "prepare" in only:
        suite.prepare()


def _report(suite: Suite, env: dict[str, Any], plan: Plan, elapsed: float, json_path: Path | None) -> None:
    """The table and the machine on stdout; with `json_path`, every figure there too."""
    print(suite.table())
    print()
    print(f"cpu flags: {' '.join(env['cpu_flags']) or 'n/a'}; native bf16: {'yes' if env['bf16_native'] else 'no'}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"machine: {env['cpu']}, {env['cpus']} CPUs, {env['capability']}; torch {env['torch']} with "
          f"{env['threads']} threads; transformers {env['transformers'] or 'not installed'}")
    print(f"ceilings measured: matmul {suite.peaks['fp32_gflops']:.0f} GFLOP/s fp32, "
          f"{suite.peaks['bf16_gflops']:.0f} GFLOP/s bf16; memory read {suite.peaks['read_gbps']:.1f} GB/s; "
          f"run took {elapsed / 60:.1f} min")
    for note in suite.notes:
        print(f"note: {note}")
    if json_path:
        json_path.write_text(json.dumps({
            "environment": env, "plan": {k: v for k, v in vars(plan).items() if k != "notes"},
            "peaks": suite.peaks, "results": [r.to_dict() for r in suite.rows],
            "targets": [t.to_dict() for t in suite.targets], "notes": suite.notes, "seconds": elapsed,
        }, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args.batch, args.steps, args.tiny)
        return 0

    plan = make_plan(args)
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    suite = Suite(plan, args.threads)
    env = suite.environment()
    log(f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs ({env['cpu']}, "
        f"{env['capability']}), load average {env['load_average'][0] if env['load_average'] else 'n/a'}")
    if env["load_average"] and env["load_average"][0] > 0.5 * (env["cpus"] or 1):
        suite.notes.append(f"the machine was busy at the start (load average {env['load_average'][0]:.1f} on "
                           f"{env['cpus']} CPUs): figures are noisy")
    started = time.perf_counter()
    suite.measure_peaks()
    _run_cases(suite, only)
    _report(suite, env, plan, time.perf_counter() - started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
