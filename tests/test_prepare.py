"""`gptcli prepare` and training from prepared data: exact chunked tokenization, document and
position splits, stdin, errors, atomic output, bounded memory, memory-mapped training, random
sampling with exact resume."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gptcli.cli import app
from gptcli.config import get_preset
from gptcli.data import RandomWindowLoader, load_splits, prepared_splits
from gptcli.errors import GptcliError, UsageError
from gptcli.events import Evaluation
from gptcli.prepare import PrepareFinished, PrepareProgress, prepare
from gptcli.settings import TrainSettings
from gptcli.textinput import ChunkReader, collect_sources
from gptcli.train import train

from .conftest import REPO_ROOT, VERDICT

runner = CliRunner()
EOT = 50256
PIECES = ["word", "the", " ", "  ", "\n", "\n\n", "\r\n", "\t", "'s", "'ll", "don't", "123", "4.5", "!", "?!",
          "é", "naïve", "日本語", "\u00a0", "\u3000", "\x1c", " \n", "\n ", "😀", "<|endoftext|>", ".", "\u2028"]


def run(inputs, out, **options) -> PrepareFinished:
    events = list(prepare(inputs, out, **options))
    assert isinstance(events[-1], PrepareFinished)
    return events[-1]


def read_bin(path: Path) -> list[int]:
    return np.fromfile(path, dtype=np.uint16).tolist()


def split_documents(tokens: list[int]) -> list[list[int]]:
    documents: list[list[int]] = [[]]
    for t in tokens:
        if t == EOT:
            documents.append([])
        else:
            documents[-1].append(t)
    return documents


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def test_chunks_are_cut_where_tokens_do_not_change(tokenizer):
    """Tokenizing the safe chunks apart gives the tokens of the whole text, for any mix of spaces,
    line breaks, Unicode whitespace, contractions and scripts."""
    rng = random.Random(0)
    checked = 0
    for _ in range(600):
        text = random_text(rng, rng.randint(1, 150))
        reader = ChunkReader(io.BytesIO(text.encode()), "x", rng.choice([16, 20, 33]), "strict")
        chunks = list(reader.chunks())
        assert "".join(chunks) == text
        if reader.forced_cuts:  # no safe place within 4 chunks: the documented exception
            continue
        checked += 1
        assert [t for c in chunks for t in tokenizer.encode_ordinary(c)] == tokenizer.encode_ordinary(text)
    assert checked > 550


def test_one_document_splits_by_position_like_the_chapter(tokenizer, tmp_path):
    text = VERDICT.read_text(encoding="utf-8")
    done = run([VERDICT], tmp_path / "data", chunk_size=512, workers=3)
    whole = tokenizer.encode_ordinary(text)
    train, val = read_bin(tmp_path / "data" / "train.bin"), read_bin(tmp_path / "data" / "val.bin")
    assert train + val == whole  # many chunks, tokenized in parallel, written in order
    assert len(train) == int(len(whole) * 0.9)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta == done.meta
    assert meta["split"] == {"by": "position", "val_ratio": 0.1}
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eot_token"]) == ("gpt2", 50257, "uint16", EOT)
    assert (meta["documents"], meta["tokens"], meta["train"]["tokens"], meta["val"]["tokens"]) == \
        (1, len(whole), len(train), len(val))
    source = meta["sources"][0]
    assert source["bytes"] == VERDICT.stat().st_size
    assert source["sha256"] == hashlib.sha256(VERDICT.read_bytes()).hexdigest()
    assert meta["gptcli_version"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_many_documents_split_by_document(tokenizer, tmp_path):
    rng = random.Random(1)
    corpus = tmp_path / "corpus"
    texts = {}
    for i in range(14):
        path = corpus / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[path] = random_text(rng, rng.randint(50, 400)) + "<|endoftext|> literal"
        path.write_text(texts[path], encoding="utf-8")
    (corpus / "notes.md").write_text("not matched by --glob")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "skip.txt").write_text("hidden directories are skipped")
    (corpus / "empty.txt").write_text("")
    done = run([corpus], tmp_path / "data", chunk_size=64, workers=2)
    meta = done.meta
    assert meta["split"]["by"] == "document"
    files = [s["path"] for s in meta["sources"]]
    assert files == sorted(files) and len(files) == 15 and not any("hidden" in f or f.endswith(".md") for f in files)
    encoded = {str(p): tokenizer.encode_ordinary(t) for p, t in texts.items()}
    for split in ("train", "val"):
        documents = split_documents(read_bin(tmp_path / "data" / f"{split}.bin"))
        expected = [encoded[s["path"]] for s in meta["sources"] if s["split"] == split]
        assert documents == expected  # whole documents, in order, one <|endoftext|> between each two
        assert meta[split]["documents"] == len(expected)
    assert meta["documents"] == 14  # the empty file is a source but no document
    assert 0.05 < meta["val"]["tokens"] / meta["tokens"] < 0.2
    # The literal text "<|endoftext|>" is ordinary text, never the special token.
    assert all(EOT not in doc for doc in encoded.values())
    assert [s["tokens"] for s in meta["sources"] if s["path"] in encoded] == [len(encoded[p]) for p in files
                                                                              if p in encoded]


def test_cli_reads_stdin_and_prints_a_summary(tokenizer, tmp_path):
    text = VERDICT.read_text(encoding="utf-8")
    result = runner.invoke(app, ["prepare", "-", "--out", str(tmp_path / "data"), "--quiet"], input=text)
    assert result.exit_code == 0, result.output
    assert "train.bin" in result.stdout and "tokens/s" in result.stdout
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["sources"][0]["path"] == "<stdin>" and meta["sources"][0]["bytes"] == len(text.encode())
    assert meta["tokens"] == len(tokenizer.encode_ordinary(text))
    one = runner.invoke(app, ["prepare", str(VERDICT), "-o", str(tmp_path / "one"), "-q", "--split-by", "document"])
    assert one.exit_code == 1 and "the validation split is empty" in one.stderr
    assert not (tmp_path / "one" / "train.bin").exists()


def test_json_output_and_existing_data_needs_force(tmp_path):
    out = tmp_path / "data"
    args = ["prepare", str(VERDICT), "-o", str(out), "--json", "--quiet", "--workers", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["tokens"] == 5145
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--force" in refused.stderr and refused.stdout == ""
    replaced = runner.invoke(app, [*args, "--force", "--val-ratio", "0.2"])
    assert replaced.exit_code == 0 and json.loads(replaced.stdout)["val"]["tokens"] == 5145 - int(5145 * 0.8)


def test_non_utf8_input_names_the_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Every effort moves you.\n" * 10 + b"caf\xe9\n" + b"more text\n")
    out = tmp_path / "data"
    with pytest.raises(GptcliError, match=r"bad.txt is not UTF-8 text \(invalid byte 0xe9 at offset 243\)"):
        run([VERDICT, bad], out, chunk_size=16)
    assert list(out.iterdir()) == []  # no train.bin, no meta.json, no temporary files
    result = runner.invoke(app, ["prepare", str(bad), "-o", str(out), "-q"])
    assert result.exit_code == 1 and "--errors replace" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    done = run([bad], out, errors="replace")
    assert done.meta["errors"] == "replace" and done.meta["tokens"] > 0


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "data"
    run([VERDICT], out)
    old = (out / "train.bin").read_bytes()
    events = prepare([VERDICT], out, chunk_size=256, workers=1, force=True)
    for event in events:
        if isinstance(event, PrepareProgress):
            break
    events.close()  # what Ctrl-C does to the command's loop
    assert list(out.iterdir()) == []  # the old data went first, the new never got into place
    with pytest.raises(GptcliError, match="no meta.json"):
        load_splits(out, None)
    # A train.bin that disagrees with meta.json (truncated, replaced) is refused too.
    run([VERDICT], out, force=True)
    (out / "train.bin").write_bytes(old[:-2])
    with pytest.raises(GptcliError, match="incomplete or was changed"):
        prepared_splits(out)


def test_vocabulary_must_fit_the_dtype(tmp_path):
    class WideTokenizer:
        n_vocab = 70_000
        eot_token = 0
        name = "wide"

        def encode_ordinary(self, text):
            return [ord(c) for c in text]

    with pytest.raises(UsageError, match="does not fit uint16"):
        run([VERDICT], tmp_path / "a", tokenizer=WideTokenizer())
    done = run([VERDICT], tmp_path / "b", tokenizer=WideTokenizer(), dtype="uint32")
    assert done.meta["dtype"] == "uint32" and prepared_splits(tmp_path / "b").train.dtype == np.uint32


@pytest.mark.parametrize("args,code,message", [
    (["missing.txt"], 1, "input not found: missing.txt"),
    (["-", "-"], 2, "stdin ('-') can be read only once"),
    (["{verdict}", "--val-ratio", "1"], 2, "--val-ratio must be between 0 and 1"),
    (["{verdict}", "--workers", "0"], 2, "--workers must be at least 1"),
    (["{verdict}", "--split-by", "chapter"], 2,
     "Invalid value for '--split-by': 'chapter' is not one of 'auto', 'document', 'position'"),
    (["{dir}"], 1, "no files matching '*.txt'"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, args, code, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(verdict=VERDICT, dir=tmp_path / "empty") for a in args]
    result = runner.invoke(app, ["prepare", *args, "-o", str(tmp_path / "out"), "-q"], input="")
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_output_directory_is_not_an_input(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "data").mkdir(parents=True)
    (corpus / "a.txt").write_text("text")
    (corpus / "data" / "stale.txt").write_text("inside the output directory")
    assert [s.name for s in collect_sources([corpus], exclude=corpus / "data")] == [str(corpus / "a.txt")]


def test_memory_stays_bounded_on_a_corpus_larger_than_the_budget(tmp_path):
    """24 MB of text through prepare raises the peak RSS by far less than the corpus (the budget is
    8 MiB): text is streamed in 64 KB blocks and at most workers + 1 chunks are in flight. The peak
    is Linux's VmHWM, reset after the warm-up (loading the tokenizer alone peaks at ~200 MB)."""
    big = tmp_path / "big.txt"
    paragraph = VERDICT.read_bytes()
    with open(big, "wb") as handle:
        for _ in range(24 * 10**6 // len(paragraph) + 1):
            handle.write(paragraph)
    script = textwrap.dedent(f"""
        import json, re
        from gptcli.prepare import prepare
        def kib(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        list(prepare([{str(VERDICT)!r}], {str(tmp_path / 'warm')!r}, workers=2, chunk_size=1 << 16))
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak to the current RSS
        before = kib("VmRSS")
        *_, done = prepare([{str(big)!r}], {str(tmp_path / 'data')!r}, workers=2, chunk_size=1 << 16)
        print(json.dumps({{"before": before, "peak": kib("VmHWM"), "tokens": done.meta["tokens"]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    if "clear_refs" in result.stderr:
        pytest.skip("this kernel cannot reset the peak RSS")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert big.stat().st_size > 24 * 10**6
    assert stats["peak"] - stats["before"] < 8 * 1024, stats  # KiB
    assert stats["tokens"] == (tmp_path / "data" / "train.bin").stat().st_size // 2 + \
        (tmp_path / "data" / "val.bin").stat().st_size // 2


# --- training from prepared data -----------------------------------------------------------------


TINY = get_preset("tiny").replace(context_length=32, drop_rate=0.0)


def settings(data: Path, out: Path, **changes) -> TrainSettings:
    values = dict(corpus=str(data), config=TINY, out=str(out), batch_size=4, eval_freq=2, eval_iter=1,
                  sample_tokens=0, epochs=1, lr=1e-3, plots=False, stride=128)
    values.update(changes)
    return TrainSettings(**values)


def evaluations(events) -> list[dict]:
    return [e.to_dict() for e in events if isinstance(e, Evaluation)]


def test_training_reads_windows_from_the_memory_map(tmp_path, tokenizer):
    data = tmp_path / "data"
    run([VERDICT], data)
    splits = load_splits(data, tokenizer)
    assert isinstance(splits.train, np.memmap) and splits.vocab_size == 50257
    args = ["train", str(data), "--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--max-steps",
            "2", "--eval-iter", "1", "--eval-freq", "1", "--sample-tokens", "3", "--out", str(tmp_path / "run"),
            "--json", "--quiet", "--no-plots"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in result.stdout.splitlines()] == [0, 1]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["corpus"] == str(data)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    refused = runner.invoke(app, [*args[:2], "--train-ratio", "0.5"])
    assert refused.exit_code == 2 and "--train-ratio does not apply" in refused.output
    small = runner.invoke(app, [*args[:-5], "--vocab-size", "1000", "--out", str(tmp_path / "small")])
    assert small.exit_code == 2 and "--vocab-size 1000 is smaller than the data's vocabulary" in small.output


def test_random_sampling_draws_fresh_windows_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    run([VERDICT], data)
    loader = RandomWindowLoader(prepared_splits(data).train, 32, 4, seed=5)
    assert np.array_equal(loader.starts(3), RandomWindowLoader(loader.dataset.tokens, 32, 4, seed=5).starts(3))
    assert not np.array_equal(loader.starts(3), loader.starts(4))
    x, y = loader.batch(0)
    start = int(loader.starts(0)[0])
    assert x[0].tolist() == loader.dataset.tokens[start:start + 32].tolist() and torch.equal(x[:, 1:], y[:, :-1])
    # With 2 ranks each takes its contiguous half of the same global batch.
    halves = [RandomWindowLoader(loader.dataset.tokens, 32, 4, seed=5, rank=r, world_size=2).batch(0)[0]
              for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)

    # Past one pass's worth of steps (36 windows / 4 = 9 steps per "epoch"), without stopping.
    full = list(train(settings(data, tmp_path / "full", sampling="random", max_steps=12)))
    assert full[-1].steps == 12 and full[-1].reason == "max_steps"
    first = list(train(settings(data, tmp_path / "split", sampling="random", max_steps=5)))
    resumed = list(train(settings(data, tmp_path / "split", sampling="random", max_steps=12), resume=True))
    assert evaluations(first) + evaluations(resumed) == evaluations(full)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
