"""The benchmark suite keeps running: benchmarks/run.py with tiny shapes (no timing is checked)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run


@pytest.mark.slow
def test_suite_runs_with_tiny_shapes(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert run.main(["--tiny", "--json", str(out), "--only", "train,memory,inference,batched,dtypes,startup"]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    cases = {(r["case"], r["impl"]) for r in data["results"]}
    for impl in ("chapter", "gptcli", "nanogpt"):
        assert ("train fp32 b2", impl) in cases and ("train bf16 b2", impl) in cases
    assert ("peak memory fp32 b2", "gptcli") in cases
    assert ("generate 8 tokens", "gptcli bf16") in cases
    assert ("start-up", "gptcli --help") in cases
    assert ("batched greedy, 6 tokens/row", "gptcli batch 4") in cases
    assert ("decode 8 tokens by dtype", "gptcli int8") in cases
    assert data["environment"]["cpu_flags"] is not None and "bf16_native" in data["environment"]
    assert any(case.startswith("eval") for case, _ in cases)
    for row in data["results"]:
        assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"], row
        if row["case"].startswith("generate") and not row["impl"].endswith("bf16") and row["impl"] != "chapter":
            assert row["note"] == "same tokens as chapter", row  # fp32 decoding: the chapter's tokens
        if row["case"].startswith("batched greedy,"):  # fp32; the other dtypes' notes only report
            assert row["note"].startswith("same tokens as batch 1"), row
    assert {t["target"] for t in data["targets"]} >= {"gptcli --help: seconds", "peak memory b2: gptcli / chapter"}
    assert "gptcli --help" in table and "targets" in table
