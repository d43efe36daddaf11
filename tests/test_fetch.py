"""`gptcli fetch` against a real HTTP server on 127.0.0.1 serving the test data in the mirror layout,
with injected faults (404, 5xx, cut connections, ignored Range headers, wrong sizes and hashes,
Ctrl-C), and against a local mirror directory."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptcli import download
from gptcli.cli import app
from gptcli.download import Origins
from gptcli.errors import GptcliError
from gptcli.transfer import NET_CHUNK_SIZE, RESUME_CHECK, FetchEvent, RetryPolicy
from tests.conftest import BPE_DIR, OPENAI_TINY, VERDICT

runner = CliRunner()
FAST = RetryPolicy(retries=2, backoff=0.0, timeout=5.0)
DATA = "124M/model.ckpt.data-00000-of-00001"


def mirror_layout() -> dict[str, Path]:
    files = {"the-verdict.txt": VERDICT}
    files.update({f"encodings/{n}": BPE_DIR / n for n in ("encoder.json", "vocab.bpe")})
    files.update({f"124M/{n}": OPENAI_TINY / n for n in download.GPT2_FILES})
    return files


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Server:
    """Serves `files` under any URL prefix in `roots`; `faults[url path]` is a queue of faults."""

    files: dict[str, Path]
    roots: tuple[str, ...] = ("", "primary", "backup")
    faults: dict[str, list[str]] = field(default_factory=dict)
    log: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, root: str = "") -> str:
        return f"http://127.0.0.1:{self.port}" + (f"/{root}" if root else "")

    def requested(self, suffix: str) -> list[str | None]:
        """Range headers of the requests for paths ending in `suffix`."""
        return [rng for path, rng in self.log if path.endswith(suffix)]


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.lstrip("/")
            server.log.append((path, self.headers.get("Range")))
            queue = server.faults.get(path, [])
            fault = queue.pop(0) if queue else ""
            root, _, rest = path.partition("/")
            relative = rest if root in server.roots else path
            source = server.files.get(relative)
            if fault.startswith("status:"):
                self.send_error(int(fault.split(":")[1]))
                return
            if source is None:
                self.send_error(404)
                return
            body = source.read_bytes() if not fault.startswith("body:") else fault[5:].encode()
            start = 0
            rng = self.headers.get("Range")
            if rng and fault != "ignore-range":
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if fault.startswith("cut:"):
                # Send part of the body, then drop the connection mid-file.
                self.wfile.write(payload[: int(fault[4:])])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on this file (a refused size, a Ctrl-C)

    return Handler


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest"


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The test files in the mirror layout, with a SHA256SUMS of them (the fixtures are not OpenAI's
    files, whose known sizes a mirror without one is held to)."""
    files = mirror_layout()
    sums = tmp_path_factory.mktemp("sums") / "SHA256SUMS"
    sums.write_text("".join(f"{sha256(path)}  {name}\n" for name, path in files.items()))
    state = Server({**files, "SHA256SUMS": sums})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def local_mirror(tmp_path: Path, sums: bool = True, bad: str | None = None) -> Path:
    """A mirror directory (symlinks to the test data) with a SHA256SUMS file."""
    root = tmp_path / "mirror"
    lines = []
    for relative, source in mirror_layout().items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).symlink_to(source)
        digest = "0" * 64 if relative == bad else sha256(source)
        lines.append(f"{digest}  {relative}\n")
    if sums:
        (root / "SHA256SUMS").write_text("".join(lines))
    return root


def origins_for(server: Server, *roots: str, official: bool = False) -> Origins:
    bases = tuple(server.url(r) for r in roots)
    return Origins(models=bases, encodings=tuple(f"{b}/encodings" for b in bases), verdict=bases, official=official,
                   root=None if official else bases[0])


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------------------------------------


def test_fetch_gpt2_from_http_mirror_then_skip_complete_files(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "124M"
    result = runner.invoke(
        app, ["fetch", "gpt2", "--size", "124M", "--mirror", server.url(), "--dir", str(dest), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [f["name"] for f in report["files"]] == [f"124M/{n}" for n in download.GPT2_FILES]
    for name in download.GPT2_FILES:
        assert (dest / name).read_bytes() == (OPENAI_TINY / name).read_bytes()
    entry = report["files"][3]
    assert entry["sha256"] == sha256(OPENAI_TINY / "model.ckpt.data-00000-of-00001")
    assert entry["bytes"] == (OPENAI_TINY / "model.ckpt.data-00000-of-00001").stat().st_size
    assert not any(p.name.endswith(".part") for p in dest.iterdir())

    server.log.clear()
    result = runner.invoke(app, ["fetch", "gpt2", "--mirror", server.url(), "--dir", str(dest)])
    assert result.exit_code == 0, result.output
    assert [path for path, _ in server.log] == ["SHA256SUMS"]  # no file was requested again
    assert "already complete" in result.stderr


def test_primary_404_falls_back_to_backup(server: Server, dest: Path) -> None:
    server.faults["primary/124M/hparams.json"] = ["status:404"]
    server.faults["primary/124M/model.ckpt.index"] = ["status:403"]
    events: list[FetchEvent] = []
    results = download.fetch_gpt2(
        "124M", dest, on_event=events.append, policy=FAST, origins=origins_for(server, "primary", "backup")
    )
    assert {r.url for r in results if r.name.endswith(("hparams.json", ".index"))} == {
        server.url("backup") + "/124M/hparams.json",
        server.url("backup") + "/124M/model.ckpt.index",
    }
    assert (dest / "hparams.json").read_bytes() == (OPENAI_TINY / "hparams.json").read_bytes()
    assert [e.name for e in events if e.kind == "fallback"] == ["124M/hparams.json", "124M/model.ckpt.index"]
    assert len(server.requested("primary/124M/hparams.json")) == 1  # a 404 is not retried


def test_connection_cut_mid_file_resumes_with_range(server: Server, dest: Path) -> None:
    server.faults[DATA] = ["cut:1500000", "cut:1000000"]
    result = download.fetch_gpt2("124M", dest, policy=FAST, origins=origins_for(server, ""))
    data = dest / "model.ckpt.data-00000-of-00001"
    assert data.read_bytes() == (OPENAI_TINY / "model.ckpt.data-00000-of-00001").read_bytes()
    ranges = server.requested(DATA)
    assert ranges[0] is None and len(ranges) == 3
    # Each resume asks for the .part's last RESUME_CHECK bytes again (compared, not rewritten).
    first, second = (int(r.removeprefix("bytes=").rstrip("-")) + RESUME_CHECK for r in ranges[1:])
    # Only an unfinished network read (< 64 KiB) is lost and fetched again.
    assert 1_500_000 - NET_CHUNK_SIZE < first <= 1_500_000
    new_bytes = 1_000_000 - RESUME_CHECK
    assert first + new_bytes - NET_CHUNK_SIZE < second <= first + new_bytes
    assert result[3].sha256 == sha256(data)


def test_server_ignoring_range_restarts_from_zero(server: Server, dest: Path) -> None:
    dest.mkdir()
    (dest / "hparams.json.part").write_bytes(b"X" * 40)  # stale: must not end up in the file
    server.faults["124M/hparams.json"] = ["ignore-range"]
    download.fetch_gpt2("124M", dest, policy=FAST, origins=origins_for(server, ""))
    assert server.requested("124M/hparams.json") == ["bytes=0-"]  # the .part's tail is checked first
    assert (dest / "hparams.json").read_bytes() == (OPENAI_TINY / "hparams.json").read_bytes()


def test_a_complete_part_is_finished_without_downloading_again(server: Server, dest: Path) -> None:
    # As after a crash between the last byte and the rename: the server answers 416.
    dest.mkdir()
    (dest / "the-verdict.txt.part").write_bytes(VERDICT.read_bytes())
    fetched = download.fetch_verdict(dest / "the-verdict.txt", policy=FAST, origins=origins_for(server, ""))
    assert server.requested("the-verdict.txt") == [f"bytes={VERDICT.stat().st_size - RESUME_CHECK}-"]
    assert fetched.sha256 == download.VERDICT_SHA256 and leftovers(dest) == ["the-verdict.txt"]


def test_5xx_is_retried_with_backoff(server: Server, dest: Path) -> None:
    server.faults["the-verdict.txt"] = ["status:503", "status:500"]
    events: list[FetchEvent] = []
    fetched = download.fetch_verdict(
        dest / "v.txt", on_event=events.append, policy=FAST, origins=origins_for(server, "")
    )
    assert fetched.sha256 == download.VERDICT_SHA256 == sha256(VERDICT)
    assert [e.message.split(";")[0] for e in events if e.kind == "retry"] == [
        "HTTP 503 Service Unavailable",
        "HTTP 500 Internal Server Error",
    ]


def test_wrong_known_size_is_refused_without_a_final_file(server: Server, dest: Path) -> None:
    # With the official origins the fixture's data file is not OpenAI's 497,759,232 bytes.
    with pytest.raises(GptcliError, match="known to be 497759232 bytes"):
        download.fetch_gpt2("124M", dest, policy=FAST, origins=origins_for(server, "", official=True))
    assert leftovers(dest) == ["checkpoint", "encoder.json", "hparams.json"]


def test_wrong_checksum_of_official_file(server: Server, dest: Path) -> None:
    tampered = VERDICT.read_text(encoding="utf-8").replace("Gisburn", "Gisbvrn")
    server.faults["the-verdict.txt"] = [f"body:{tampered}"]
    with pytest.raises(GptcliError, match="has sha256 .* expected b41e41a68f03"):
        download.fetch_verdict(dest / "v.txt", policy=FAST, origins=origins_for(server, "", official=True))
    assert leftovers(dest) == []


def test_mirror_sha256sums_mismatch_is_an_error(tmp_path: Path) -> None:
    mirror = local_mirror(tmp_path, bad="124M/hparams.json")
    dest = tmp_path / "dest"
    result = runner.invoke(app, ["fetch", "gpt2", "--mirror", str(mirror), "--dir", str(dest)])
    assert result.exit_code == 1
    error = last_line(result.stderr)
    assert error.startswith("error: 124M/hparams.json from ") and "expected 000000000000" in error
    assert "hparams.json" not in leftovers(dest) and "hparams.json.part" not in leftovers(dest)


def test_ctrl_c_leaves_a_resumable_part(server: Server, dest: Path) -> None:
    def interrupt(event: FetchEvent) -> None:
        if event.kind == "progress" and event.name == DATA:
            raise KeyboardInterrupt

    origins = origins_for(server, "")
    with pytest.raises(KeyboardInterrupt):
        download.fetch_gpt2("124M", dest, on_event=interrupt, origins=origins, policy=FAST)
    part = dest / "model.ckpt.data-00000-of-00001.part"
    have = part.stat().st_size
    assert have > 0 and not (dest / "model.ckpt.data-00000-of-00001").exists()

    server.log.clear()
    download.fetch_gpt2("124M", dest, origins=origins, policy=FAST)
    assert server.requested(DATA) == [f"bytes={max(0, have - RESUME_CHECK)}-"]
    assert sha256(dest / "model.ckpt.data-00000-of-00001") == sha256(OPENAI_TINY / "model.ckpt.data-00000-of-00001")
    assert not part.exists()


def test_ctrl_c_in_the_command_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "fetch_verdict", interrupted)
    result = runner.invoke(app, ["fetch", "verdict"])
    assert result.exit_code == 130 and "run the same command to resume" in result.stderr


def test_connection_refused_names_the_url(dest: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    origins = Origins(verdict=(url,), official=True)
    with pytest.raises(GptcliError) as caught:
        download.fetch_verdict(dest / "v.txt", policy=RetryPolicy(retries=1, backoff=0), origins=origins)
    assert caught.value.message == (f"cannot download the-verdict.txt: {url}/the-verdict.txt: connection refused")
    assert leftovers(dest) == []

    result = runner.invoke(app, ["fetch", "verdict", "--mirror", url, "--retries", "0"])
    assert result.exit_code == 1
    assert last_line(result.stderr).startswith("error: ") and f"{url}/" in last_line(result.stderr)


def test_verdict_and_tokenizer_from_local_mirror_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    from gptcli.paths import tokenizer_cache_dir, verdict_cache_path

    mirror = local_mirror(tmp_path)
    monkeypatch.setenv("GPTCLI_MIRROR", str(mirror))
    result = runner.invoke(app, ["fetch", "verdict"])
    assert result.exit_code == 0, result.output
    assert verdict_cache_path().read_bytes() == VERDICT.read_bytes()
    result = runner.invoke(app, ["fetch", "tokenizer", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [f["sha256"] for f in report["files"]] == [download.ENCODER_JSON_SHA256, download.VOCAB_BPE_SHA256]

    from gptcli.tokenizer import get_tokenizer

    assert get_tokenizer().encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert (tokenizer_cache_dir() / "vocab.bpe").is_file()


def test_bundled_files_are_the_canonical_ones() -> None:
    """The package's copies carry the sha256 (and size) `fetch` verifies downloads against."""
    from gptcli import assets

    assert sha256(assets.VERDICT) == download.VERDICT_SHA256
    assert assets.VERDICT.stat().st_size == download.KNOWN_SIZES["the-verdict.txt"]
    assert sha256(assets.BPE_DIR / "encoder.json") == download.ENCODER_JSON_SHA256
    assert sha256(assets.BPE_DIR / "vocab.bpe") == download.VOCAB_BPE_SHA256


def test_fetch_convert_sample_end_to_end_on_a_local_mirror(tmp_path: Path) -> None:
    import torch

    from gptcli.modelfile import load_model

    mirror = local_mirror(tmp_path)
    result = runner.invoke(app, ["fetch", "gpt2", "--size", "124M", "--mirror", str(mirror), "--convert"])
    assert result.exit_code == 0, result.output
    model_dir = download.default_model_dir("124M")
    model, path = load_model(model_dir)
    assert path == model_dir / "model.safetensors"
    expected = json.loads((OPENAI_TINY / "expected.json").read_text())
    ids = torch.tensor([expected["prompt"]["token_ids"]])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert ids[0, 4:].tolist() == expected["greedy"]["new_token_ids"][:5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fetch", "verdict", "--dir", "x"], "--out FILE"),
        (["fetch", "tokenizer", "--out", "x"], "--out is for `fetch verdict`"),
        (["fetch", "verdict", "--convert"], "--convert is for `fetch gpt2`"),
        (
            ["fetch", "verdict", "--mirror", "/no/such/dir"],
            "neither an http(s):// URL nor an existing directory",
        ),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def _altered_part(dest: Path, name: str, source: Path) -> Path:
    """A `.part` whose start is right but which then holds bytes the source does not: resuming it
    would give a file of the right size and the wrong content."""
    dest.mkdir(exist_ok=True)
    part = dest / f"{name}.part"
    part.write_bytes(source.read_bytes()[:40] + b"X" * 20)
    return part


def test_an_altered_part_is_not_resumed_over_http(server: Server, dest: Path) -> None:
    # A mirror without SHA256SUMS, and a file gptcli knows no hash of: only the tail check can tell.
    base = server.url()
    origins = Origins(models=(base,), encodings=(f"{base}/encodings",), verdict=(base,), official=False)
    _altered_part(dest, "hparams.json", OPENAI_TINY / "hparams.json")
    with pytest.raises(GptcliError):  # the fixture's data file is not OpenAI's size: known facts apply
        download.fetch_gpt2("124M", dest, policy=FAST, origins=origins)
    assert (dest / "hparams.json").read_bytes() == (OPENAI_TINY / "hparams.json").read_bytes()


def test_an_altered_part_is_not_resumed_from_a_local_mirror(tmp_path: Path, dest: Path) -> None:
    mirror = local_mirror(tmp_path, sums=False)
    _altered_part(dest, "hparams.json", OPENAI_TINY / "hparams.json")
    with pytest.raises(GptcliError):  # the fixture's data file is not OpenAI's size: known facts apply
        download.fetch_gpt2("124M", dest, mirror=str(mirror), policy=FAST)
    assert (dest / "hparams.json").read_bytes() == (OPENAI_TINY / "hparams.json").read_bytes()


def test_a_mirror_without_sums_is_held_to_the_known_hashes(tmp_path: Path, dest: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_bytes(VERDICT.read_bytes()[:-1] + b"!")  # same size, other text
    with pytest.raises(GptcliError, match="has sha256 .*, expected b41e41a68f03"):
        download.fetch_verdict(dest / "v.txt", mirror=str(mirror), policy=FAST)
    assert leftovers(dest) == []


def test_tokenizer_ranks_equal_tiktoken_s_own_reading_of_the_bpe_files(tmp_path: Path) -> None:
    """gptcli reads the ranks from encoder.json once both files are GPT-2's; tiktoken's reader derives
    them from vocab.bpe too: the same 50,256 ranks. A changed file is refused as corrupt."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from gptcli import assets, tokenizer
    from gptcli.errors import GptcliError

    bundled = assets.BPE_DIR
    reference = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bundled / "vocab.bpe"),
                                                encoder_json_file=str(bundled / "encoder.json"))
    assert tokenizer._mergeable_ranks(bundled) == reference
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((bundled / name).read_bytes())
    (tmp_path / "vocab.bpe").write_bytes((bundled / "vocab.bpe").read_bytes() + b"x y\n")
    with pytest.raises(GptcliError, match="vocab.bpe has another sha256"):
        tokenizer._mergeable_ranks(tmp_path)
