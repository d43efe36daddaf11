"""Peak memory of a few training steps: each implementation in its own fresh process (benchmarks/run.py
--child-memory), rounds interleaved (A, B, C, A, B, C ...), its peak resident set."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.cases.training import batch, build_trainer, train_impls
from benchmarks.harness import ROOT, Row, Suite, Target, log, peak_rss_mb
from benchmarks.plan import train_config

ENTRY = ROOT / "benchmarks" / "run.py"


def child_memory(name: str, size: int, steps: int, tiny: bool) -> None:
    """In the child process: `steps` fp32 training steps of `name`; its peaks as JSON on stdout."""
    before = peak_rss_mb()
    config = train_config(tiny)
    step = build_trainer(name, config)
    x, y = batch(config, size)
    for _ in range(steps):
        step(x, y, "fp32")
    print(json.dumps({"impl": name, "batch": size, "steps": steps, "before_mb": before, "peak_mb": peak_rss_mb()}))


def _child(suite: Suite, name: str, size: int) -> dict[str, Any] | None:
    """One fresh process for `name` at batch `size`: what it printed, or None (and a note) if it failed."""
    cmd = [sys.executable, str(ENTRY), "--child-memory", name, "--batch", str(size), "--steps",
           str(suite.plan.memory_steps)]
    if suite.plan.tiny:
        cmd.append("--tiny")
    if suite.threads:
        cmd += ["--threads", str(suite.threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        suite.notes.append(f"memory {name} b{size} failed: {result.stderr.strip()[-300:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _batch_size(suite: Suite, names: list[str], size: int) -> None:
    case = f"peak memory fp32 b{size}"
    log(f"  {case}: {', '.join(names)} (one process each, {suite.plan.memory_reps} rounds)")
    peaks: dict[str, list[float]] = {name: [] for name in names}
    before: dict[str, float] = {}
    for _ in range(suite.plan.memory_reps):
        for name in names:
            data = _child(suite, name, size)
            if data is None:
                continue
            peaks[name].append(data["peak_mb"])
            before[name] = data["before_mb"]
            log(f"    {name}: {data['peak_mb']:.0f} MB")
    rows = [Row(case, name, values, "MB", higher_is_better=False,
                note=f"{before[name]:.0f} MB after import; {suite.plan.memory_steps} steps")
            for name, values in peaks.items() if values]
    by_name = suite.add(rows, "chapter")
    if "chapter" in by_name and "gptcli" in by_name:
        suite.targets.append(Target(f"peak memory b{size}: gptcli / chapter", by_name["gptcli"].ratio, 0.8,
                                    at_most=True))


def run(suite: Suite) -> None:
    """`--only memory`: peak memory at each batch size."""
    log("peak memory")
    names = train_impls() if suite.plan.memory_all else ["chapter", "gptcli"]
    for size in suite.plan.memory_batches:
        _batch_size(suite, names, size)
