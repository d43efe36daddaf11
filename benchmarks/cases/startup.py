"""Start-up time of the CLI: `gptcli --help` and `gptcli sample --help` in fresh processes, against
`python -c pass`, and whether the help path imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
