"""Start-up time of the CLI: `gptcli --help` and `gptcli sample --help` in fresh processes, against
`python -c pass`, and whether the help path imports torch; then the time from starting `gptcli
sample` (a 124M model file, --stream) to its first generated token on stdout, the first run and the
later ones (warm page cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, Row, Suite, Target, log


def run(suite: Suite) -> None:
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
        for _ in range(suite.plan.help_reps):
            started = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, env=env, cwd=ROOT)
            times.append(time.perf_counter() - started)
        rows.append(Row("start-up", name, times, "s", higher_is_better=False))
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, gptcli.cli; print(int('torch' in sys.modules))"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )
    rows[1].note = "torch imported on the help path!" if probe.stdout.strip() == "1" else "no torch import"
    suite.add(rows, None)
    for row in rows[1:]:
        suite.targets.append(Target(f"{row.impl}: seconds", row.median, 0.3, at_most=True))
    first_token(suite, env)


def _seconds_to_first_token(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from starting `cmd` to the first byte on its stdout."""
    started = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT) as proc:
        assert proc.stdout is not None
        proc.stdout.read(1)
        elapsed = time.perf_counter() - started
        proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return elapsed


def first_token(suite: Suite, env: dict[str, str]) -> None:
    """`gptcli sample MODEL --stream --completion-only`: process start to the first token, per dtype."""
    import torch

    from gptcli.config import get_preset
    from gptcli.model import GPT
    from gptcli.modelfile import save_model

    log("gptcli sample: first token")
    config = get_preset("tiny" if suite.plan.tiny else "124M").replace(context_length=1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        torch.manual_seed(0)
        save_model(path, GPT(config))
        rows = []
        for dtype in ("fp32", "bf16", "int8"):
            cmd = [sys.executable, "-m", "gptcli", "sample", "-m", str(path), "--stream", "--completion-only",
                   "-n", "8", "--dtype", dtype, "--threads", str(suite.threads or torch.get_num_threads())]
            times = [_seconds_to_first_token(cmd, env) for _ in range(max(2, suite.plan.help_reps))]
            rows.append(Row("first token", f"gptcli sample {dtype}", times[1:], "s", higher_is_better=False,
                            note=f"first run {times[0]:.2f} s"))
        suite.add(rows, None)
    for row in rows:
        suite.targets.append(Target(f"{row.impl}: seconds to first token", row.median, 1.5, at_most=True))
