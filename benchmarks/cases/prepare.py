"""`gptcli prepare` against raw tiktoken batch encoding (benchmarks/prepare_bench.py, in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.harness import ROOT, Row, Suite, log


def run(suite: Suite) -> None:
    script = ROOT / "benchmarks" / "prepare_bench.py"
    if not suite.plan.prepare_mb:
        return
    if not script.exists():
        suite.notes.append("prepare: benchmarks/prepare_bench.py is missing; skipped")
        return
    log(f"prepare vs raw tiktoken ({suite.plan.prepare_mb} MB)")
    cmd = [sys.executable, str(script), "--size-mb", str(suite.plan.prepare_mb), "--json"]
    if suite.threads:
        cmd += ["--workers", str(suite.threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        suite.notes.append(f"prepare: skipped ({result.stderr.strip().splitlines()[-1:]})")
        return
    data = json.loads(result.stdout.strip().splitlines()[-1])
    case = f"prepare {data.get('corpus_mb', suite.plan.prepare_mb):.0f} MB"
    rows = [Row(case, "tiktoken batch", [data["baseline_tokens_per_s"]], "tokens/s",
                note=f"peak {data.get('baseline_peak_rss_mib') or 0:.0f} MB"),
            Row(case, "gptcli prepare", [data["prepare_tokens_per_s"]], "tokens/s",
                note=f"peak {data.get('prepare_peak_rss_mib') or 0:.0f} MB; "
                     + ("same tokens" if data.get("same_tokens") else "TOKENS DIFFER"))]
    suite.add(rows, "tiktoken batch")
