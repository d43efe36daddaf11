"""The benchmark harness: the machine's ceilings (matmul peak, memory read bandwidth), its CPU flags,
interleaved timing (A, B, C, A, B, C ...), the rows and targets a run collects (medians, ranges,
ratios to a baseline), the table and the `--json` file."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.plan import Plan

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


# --- the machine ----------------------------------------------------------------------------------


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


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


def environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": load, "transformers": transformers_version(), "cpu_flags": cpu_flags(),
        "bf16_native": _bf16_native(),
    }


# --- what a run collects --------------------------------------------------------------------------


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


@dataclass
class Suite:
    """One run: its plan, and the rows, targets, ceilings and notes the cases add to it."""

    plan: Plan
    threads: int | None
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_rows: dict[tuple[str, int], dict[str, Row]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.notes[:0] = self.plan.notes

    def add(self, rows: list[Row], baseline: str | None) -> dict[str, Row]:
        """Keep `rows`, each with its ratio to the `baseline` implementation's median; by name."""
        by_name = {r.impl: r for r in rows}
        if baseline and baseline in by_name:
            base = by_name[baseline].median
            for r in rows:
                r.ratio = r.median / base if base else None
        self.rows.extend(rows)
        return by_name

    def measure_peaks(self) -> None:
        """The machine's ceilings: matmul peaks in fp32 and bf16, memory read bandwidth."""
        log("machine: matmul peaks and read bandwidth")
        size = self.plan.peak_size
        self.peaks["fp32_gflops"] = matmul_peak(torch.float32, size)
        self.peaks["bf16_gflops"] = matmul_peak(torch.bfloat16, size)
        self.peaks["read_gbps"] = read_bandwidth(self.plan.bandwidth_mb)
        log(f"  fp32 {self.peaks['fp32_gflops']:.0f} GFLOP/s, bf16 {self.peaks['bf16_gflops']:.0f} GFLOP/s, "
            f"read {self.peaks['read_gbps']:.1f} GB/s")


# --- the report -----------------------------------------------------------------------------------

HEADER = ("case", "implementation", "median", "range", "unit", "vs base", "efficiency", "note")


def _cells(r: Row) -> tuple[str, ...]:
    digits = 3 if r.unit == "s" else (0 if r.median >= 100 else 1)
    return (r.case, r.impl, f"{r.median:.{digits}f}", f"{min(r.values):.{digits}f}-{max(r.values):.{digits}f}",
            r.unit, "" if r.ratio is None else f"{r.ratio:.2f}x", r.extra, r.note)


def _target_lines(targets: list[Target]) -> list[str]:
    out = ["", "targets"]
    for t in targets:
        mark = {True: "met", False: "NOT MET", None: "n/a"}[t.met]
        sign = "<=" if t.at_most else ">="
        value = "n/a" if t.value is None else f"{t.value:.2f}"
        out.append(f"  {t.name:52} {value:>6}  (goal {sign} {t.goal:g})  {mark}")
    return out


def table(rows: list[Row], targets: list[Target]) -> str:
    """The rows, one block per case (the case named once), then the targets."""
    lines = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(HEADER)]

    def fmt(cols: tuple[str, ...]) -> str:
        parts = []
        for i, (c, w) in enumerate(zip(cols, widths, strict=True)):
            parts.append(c.rjust(w) if i in (2, 3, 5) else c.ljust(w))
        return "  ".join(parts).rstrip()

    out = [fmt(HEADER), fmt(tuple("-" * w for w in widths))]
    previous = None
    for line in lines:
        if previous is not None and line[0] != previous:
            out.append("")
        out.append(fmt(line if line[0] != previous else ("",) + line[1:]))
        previous = line[0]
    if targets:
        out.extend(_target_lines(targets))
    return "\n".join(out)


def report(suite: Suite, env: dict[str, Any], elapsed: float, json_path: Path | None) -> None:
    """The table and the machine on stdout; with `json_path`, every figure there too."""
    print(table(suite.rows, suite.targets))
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
        write_json(json_path, suite, env, elapsed)


def write_json(path: Path, suite: Suite, env: dict[str, Any], elapsed: float) -> None:
    path.write_text(json.dumps({
        "environment": env, "plan": {k: v for k, v in vars(suite.plan).items() if k != "notes"},
        "peaks": suite.peaks, "results": [r.to_dict() for r in suite.rows],
        "targets": [t.to_dict() for t in suite.targets], "notes": suite.notes, "seconds": elapsed,
    }, indent=2) + "\n")
