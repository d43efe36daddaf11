"""Data shipped inside the package so the chapter's run and the tokenizer work offline: the
chapter's corpus and GPT-2's BPE files (licences in README.md beside this file). `gptcli fetch`
still downloads the canonical copies; the tests check these against the same sha256."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
VERDICT = ASSETS_DIR / "the-verdict.txt"
BPE_DIR = ASSETS_DIR / "gpt2"
