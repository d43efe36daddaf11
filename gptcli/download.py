"""Downloads for `gptcli fetch`: the chapter's corpus, GPT-2's BPE files and OpenAI's checkpoints.

Each file is streamed into `<name>.part`, resumed with an HTTP Range request after an
interruption, retried with exponential backoff on connection errors and 5xx answers, verified
(Content-Length, and for OpenAI's official files their known sizes and sha256 where known) and only
then renamed into place. A file already in place with the right size (and hash, where known) is
not downloaded again. Nothing here prints: progress is reported as `FetchEvent`s to a callback,
which may raise (e.g. KeyboardInterrupt) to stop; the `.part` file then stays for a resume.

Mirrors (`--mirror` or `$GPTCLI_MIRROR`, an http(s):// URL or a local directory) replace all
base URLs and use this layout::

    <mirror>/the-verdict.txt
    <mirror>/encodings/encoder.json, <mirror>/encodings/vocab.bpe
    <mirror>/<size>/<file>             (124M/model.ckpt.index, ...)
    <mirror>/SHA256SUMS                (optional, `sha256sum` format, paths as above)

A mirror may hold other files than OpenAI's (test fixtures), so on a mirror only the
Content-Length and the mirror's own SHA256SUMS are checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gptcli import durable
from gptcli.choices import GPT2_SIZES
from gptcli.durable import fsync_path
from gptcli.errors import GptcliError, UsageError
from gptcli.paths import cache_dir, check_can_create, tokenizer_cache_dir, verdict_cache_path
from gptcli.tokenizer import ENCODER_JSON, ENCODER_JSON_SHA256, VOCAB_BPE, VOCAB_BPE_SHA256

if TYPE_CHECKING:
    import requests

MIRROR_ENV = "GPTCLI_MIRROR"
OPENAI_MODELS_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_MODELS_BASE = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"  # the chapter's backup
OPENAI_ENCODINGS_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
VERDICT_BASE = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code"
VERDICT_FILE = "the-verdict.txt"
SHA256SUMS = "SHA256SUMS"

GPT2_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)

# Facts about the official files, checked only when downloading from the official URLs.
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
KNOWN_SIZES: dict[str, int] = {
    VERDICT_FILE: 20_479,
    f"encodings/{ENCODER_JSON}": 1_042_301,
    f"encodings/{VOCAB_BPE}": 456_318,
    "124M/model.ckpt.data-00000-of-00001": 497_759_232,
    "124M/model.ckpt.index": 5_215,
    "124M/model.ckpt.meta": 471_155,
}
KNOWN_SHA256: dict[str, str] = {
    VERDICT_FILE: VERDICT_SHA256,
    f"encodings/{ENCODER_JSON}": ENCODER_JSON_SHA256,
    f"encodings/{VOCAB_BPE}": VOCAB_BPE_SHA256,
}

CHUNK_SIZE = 1 << 20
# Bytes of a network read; what was received of an unfinished read is lost when the connection
# breaks, so this bounds what a resume has to fetch again.
NET_CHUNK_SIZE = 1 << 16


@dataclass(frozen=True)
class Origins:
    """Base locations tried in order for each kind of file, and whether they are the official ones
    (whose known sizes and hashes then apply). Tests substitute their own local server here."""

    models: tuple[str, ...] = (OPENAI_MODELS_BASE, BACKUP_MODELS_BASE)
    encodings: tuple[str, ...] = (OPENAI_ENCODINGS_BASE,)
    verdict: tuple[str, ...] = (VERDICT_BASE,)
    official: bool = True
    root: str | None = None  # a mirror's root, where its SHA256SUMS lives

    @classmethod
    def mirror(cls, base: str) -> Origins:
        base = _normalise_mirror(base)
        base = base.rstrip("/") if _is_url(base) else str(Path(base).expanduser())
        if not _is_url(base) and not Path(base).is_dir():
            raise UsageError(f"mirror {base} is neither an http(s):// URL nor an existing directory")
        return cls((base,), (_join(base, "encodings"),), (base,), official=False, root=base)


DEFAULT_ORIGINS = Origins()


def resolve_origins(mirror: str | None = None, origins: Origins | None = None) -> Origins:
    """`mirror`, else `$GPTCLI_MIRROR`, else `origins`, else the official URLs."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror:
        return Origins.mirror(mirror)
    return origins or DEFAULT_ORIGINS


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its mirror-relative name, the URLs to try in order and where it goes."""

    name: str
    urls: tuple[str, ...]
    dest: Path
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class FetchEvent:
    """What the downloader is doing. kinds: start (a transfer begins; `done` > 0 when resuming),
    progress, retry (after an error, `message` says why), fallback (a URL failed, the next is
    tried), skip (already complete), done."""

    kind: Literal["start", "progress", "retry", "fallback", "skip", "done"]
    name: str
    url: str = ""
    done: int = 0
    total: int | None = None
    message: str = ""


EventCallback = Callable[[FetchEvent], None]


@dataclass(frozen=True)
class Fetched:
    name: str
    path: Path
    bytes: int
    sha256: str | None
    url: str | None  # None when the file was already complete
    skipped: bool = False


@dataclass
class RetryPolicy:
    """`retries` further attempts per URL after the first, waiting backoff * 2**n seconds."""

    retries: int = 3
    backoff: float = 1.0
    timeout: float = 30.0


class _Transient(Exception):
    """Worth retrying: connection trouble, a 5xx answer, a transfer cut short."""


class _Permanent(Exception):
    """Not worth retrying this URL (404 and the like); try the next one."""


@dataclass
class _Context:
    on_event: EventCallback | None
    policy: RetryPolicy
    session: requests.Session | None = None
    sums_cache: dict[str, dict[str, str] | None] = field(default_factory=dict)

    def emit(self, event: FetchEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def http(self) -> requests.Session:
        if self.session is None:
            import requests

            self.session = requests.Session()
            self.session.headers["User-Agent"] = "gptcli"
            # Raw bytes only: with gzip, Content-Length and Range would count compressed bytes.
            self.session.headers["Accept-Encoding"] = "identity"
        return self.session


def _normalise_mirror(base: str) -> str:
    """http(s) URLs with a lower-case scheme, file:// as its directory; other schemes are refused."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", base)
    if match is None:
        return base
    scheme = match.group(1).lower()
    if scheme == "file":
        return base[match.end():]
    if scheme not in ("http", "https"):
        raise UsageError(
            f"mirror {base}: the {scheme}:// scheme is not supported; use an http:// or https:// URL "
            "or a local directory"
        )
    return scheme + base[len(scheme):]


def _is_url(base: str) -> bool:
    return base.startswith(("http://", "https://"))


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if _is_url(base) else str(Path(base) / relative)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# Transfers.


def _transfer_http(ctx: _Context, remote: Remote, url: str, part: Path) -> None:
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = ctx.http().get(url, headers=headers, stream=True, timeout=ctx.policy.timeout)
    except requests.RequestException as exc:
        raise _Transient(_describe(exc)) from None
    with response:
        status = response.status_code
        if status == 416 and have:
            # The range starts at or past the end: the .part may already be whole.
            match = re.match(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == have:
                return
            part.unlink()
            raise _Transient("the partial download does not fit the file on the server; restarting")
        if status >= 500:
            raise _Transient(f"HTTP {status} {response.reason}")
        if status >= 400:
            raise _Permanent(f"HTTP {status} {response.reason}")
        total: int | None
        if status == 206 and have:
            match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink()
                raise _Transient("the server answered the range request with a different range; restarting")
            total = int(match.group(2)) if match.group(2) != "*" else None
            mode = "ab"
        else:
            # A plain 200: the server ignored the Range header (or there was none), so start over.
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if remote.size is not None and total is not None and total != remote.size:
            part.unlink(missing_ok=True)
            raise _Permanent(f"{total} bytes, but {remote.name} is known to be {remote.size} bytes")
        ctx.emit(FetchEvent("start", remote.name, url, have, total))
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed connection creates nothing
        with open(part, mode) as handle:
            try:
                for chunk in response.iter_content(NET_CHUNK_SIZE):
                    handle.write(chunk)
                    have += len(chunk)
                    ctx.emit(FetchEvent("progress", remote.name, url, have, total))
            except requests.RequestException as exc:
                raise _Transient(f"{_describe(exc)} after {have} bytes") from None
        if total is not None and have != total:
            raise _Transient(f"connection closed after {have} of {total} bytes")


def _transfer_local(ctx: _Context, remote: Remote, source: str, part: Path) -> None:
    path = Path(source)
    if not path.is_file():
        raise _Permanent("no such file")
    total = path.stat().st_size
    have = part.stat().st_size if part.exists() else 0
    if have > total:
        part.unlink()
        have = 0
    ctx.emit(FetchEvent("start", remote.name, source, have, total))
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as src, open(part, "ab" if have else "wb") as dst:
        src.seek(have)
        for block in iter(lambda: src.read(CHUNK_SIZE), b""):
            dst.write(block)
            have += len(block)
            ctx.emit(FetchEvent("progress", remote.name, source, have, total))
    if have != total:
        raise _Transient(f"read {have} of {total} bytes")


def _describe(exc: BaseException) -> str:
    """A short reason for a requests error (its messages nest urllib3's whole story)."""
    import requests

    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for reason in (
            "Connection refused",
            "Name or service not known",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "Connection reset by peer",
            "timed out",
        ):
            if reason in text:
                return reason.lower()
        return "connection failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection broken"
    return type(exc).__name__


def _fetch_from(ctx: _Context, remote: Remote, url: str, part: Path) -> None:
    """One URL with retries; raises _Permanent/_Transient when this URL is given up."""
    attempt = 0
    while True:
        try:
            if _is_url(url):
                _transfer_http(ctx, remote, url, part)
            else:
                _transfer_local(ctx, remote, url, part)
            return
        except _Transient as exc:
            if attempt >= ctx.policy.retries:
                raise
            delay = ctx.policy.backoff * 2**attempt
            attempt += 1
            ctx.emit(FetchEvent("retry", remote.name, url, message=f"{exc}; retry {attempt} in {delay:g}s"))
            if delay > 0:
                time.sleep(delay)


def _verify(remote: Remote, part: Path, url: str) -> str:
    """The sha256 of a finished `.part`, after checking its known size and hash (else it goes)."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise GptcliError(f"{remote.name} from {url} is {size} bytes, expected {remote.size}; removed it")
    digest = _sha256(part)
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink()
        raise GptcliError(
            f"{remote.name} from {url} has sha256 {digest[:12]}…, expected {remote.sha256[:12]}…; removed it"
        )
    return digest


def _complete(remote: Remote, want_sha256: bool) -> tuple[bool, str | None]:
    """Whether `remote.dest` is already there and right, and its sha256 when computed."""
    if not remote.dest.is_file():
        return False, None
    if remote.size is not None and remote.dest.stat().st_size != remote.size:
        return False, None
    if remote.sha256 is None and not want_sha256:
        return True, None
    digest = _sha256(remote.dest)
    return remote.sha256 is None or digest == remote.sha256, digest


def fetch_one(ctx: _Context, remote: Remote, want_sha256: bool = True) -> Fetched:
    ok, digest = _complete(remote, want_sha256)
    if ok:
        size = remote.dest.stat().st_size
        ctx.emit(FetchEvent("skip", remote.name, done=size, total=size))
        return Fetched(remote.name, remote.dest, size, digest, None, skipped=True)
    part = part_path(remote.dest)
    failures: list[str] = []
    for index, url in enumerate(remote.urls):
        try:
            _fetch_from(ctx, remote, url, part)
        except (_Transient, _Permanent) as exc:
            failures.append(f"{url}: {exc}")
            if index + 1 < len(remote.urls):
                ctx.emit(FetchEvent("fallback", remote.name, url, message=str(exc)))
            continue
        except OSError as exc:  # the local side: a full disk, no permission, an unreadable mirror
            raise GptcliError(f"cannot fetch {remote.name} into {part}: {exc.strerror or exc}") from None
        digest = _verify(remote, part, url)
        fsync_path(part)
        durable.replace(part, remote.dest)
        size = remote.dest.stat().st_size
        ctx.emit(FetchEvent("done", remote.name, url, size, size))
        return Fetched(remote.name, remote.dest, size, digest, url)
    # Keep a non-empty .part: the next run resumes it; an empty one is just clutter.
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    raise GptcliError(f"cannot download {remote.name}: " + "; ".join(failures))


# --------------------------------------------------------------------------------------------
# What to fetch.


def _mirror_sums(ctx: _Context, base: str) -> dict[str, str] | None:
    """The mirror's SHA256SUMS as {relative path: sha256}, or None when it has none."""
    if base in ctx.sums_cache:
        return ctx.sums_cache[base]
    url = _join(base, SHA256SUMS)
    text: str | None = None
    if _is_url(base):
        import requests

        try:
            response = ctx.http().get(url, timeout=ctx.policy.timeout)
        except requests.RequestException as exc:
            raise GptcliError(f"cannot reach the mirror: {url}: {_describe(exc)}") from None
        if response.status_code == 200:
            text = response.text
        elif response.status_code != 404:
            raise GptcliError(f"cannot read {url}: HTTP {response.status_code} {response.reason}")
    elif Path(url).is_file():
        text = Path(url).read_text(encoding="utf-8")
    sums = None if text is None else _parse_sums(text, url)
    ctx.sums_cache[base] = sums
    return sums


def _parse_sums(text: str, where: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if not match:
            raise GptcliError(f"{where}:{number}: not a `sha256sum` line")
        sums[match.group(2).removeprefix("./")] = match.group(1).lower()
    return sums


def _remote(ctx: _Context, origins: Origins, bases: tuple[str, ...], relative: str, name: str, dest: Path) -> Remote:
    """`relative` is the path below each base; `name` the path below a mirror's root."""
    urls = tuple(_join(base, relative) for base in bases)
    if origins.official:
        return Remote(name, urls, dest, KNOWN_SIZES.get(name), KNOWN_SHA256.get(name))
    sums = _mirror_sums(ctx, origins.root) if origins.root else None
    return Remote(name, urls, dest, None, (sums or {}).get(name))


def verdict_remote(ctx: _Context, origins: Origins, dest: Path) -> Remote:
    return _remote(ctx, origins, origins.verdict, VERDICT_FILE, VERDICT_FILE, dest)


def tokenizer_remotes(ctx: _Context, origins: Origins, directory: Path) -> list[Remote]:
    return [
        _remote(ctx, origins, origins.encodings, name, f"encodings/{name}", directory / name)
        for name in (ENCODER_JSON, VOCAB_BPE)
    ]


def gpt2_remotes(ctx: _Context, origins: Origins, size: str, directory: Path) -> list[Remote]:
    if size not in GPT2_SIZES:
        raise UsageError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    return [
        _remote(ctx, origins, origins.models, f"{size}/{name}", f"{size}/{name}", directory / name)
        for name in GPT2_FILES
    ]


def default_model_dir(size: str) -> Path:
    return cache_dir() / "models" / size


def _run(
    remotes_for: Callable[[_Context], list[Remote]],
    on_event: EventCallback | None,
    policy: RetryPolicy | None,
    want_sha256: bool,
) -> list[Fetched]:
    ctx = _Context(on_event, policy or RetryPolicy())
    try:
        remotes = remotes_for(ctx)
        for remote in remotes:
            check_can_create(remote.dest)
        return [fetch_one(ctx, remote, want_sha256) for remote in remotes]
    finally:
        if ctx.session is not None:
            ctx.session.close()


def fetch_verdict(
    out: str | Path | None = None,
    mirror: str | None = None,
    on_event: EventCallback | None = None,
    policy: RetryPolicy | None = None,
    origins: Origins | None = None,
    want_sha256: bool = True,
) -> Fetched:
    """The chapter's corpus into `out` (default: gptcli's cache)."""
    resolved = resolve_origins(mirror, origins)
    dest = Path(out) if out is not None else verdict_cache_path()
    return _run(lambda ctx: [verdict_remote(ctx, resolved, dest)], on_event, policy, want_sha256)[0]


def fetch_tokenizer(
    directory: str | Path | None = None,
    mirror: str | None = None,
    on_event: EventCallback | None = None,
    policy: RetryPolicy | None = None,
    origins: Origins | None = None,
    want_sha256: bool = True,
) -> list[Fetched]:
    """GPT-2's encoder.json and vocab.bpe (default: gptcli's tokenizer cache)."""
    resolved = resolve_origins(mirror, origins)
    dest = Path(directory) if directory is not None else tokenizer_cache_dir()
    return _run(lambda ctx: tokenizer_remotes(ctx, resolved, dest), on_event, policy, want_sha256)


def fetch_gpt2(
    size: str,
    directory: str | Path | None = None,
    mirror: str | None = None,
    on_event: EventCallback | None = None,
    policy: RetryPolicy | None = None,
    origins: Origins | None = None,
    want_sha256: bool = True,
) -> list[Fetched]:
    """OpenAI's seven GPT-2 release files of `size` (default: `<cache>/models/<size>`)."""
    resolved = resolve_origins(mirror, origins)
    if size not in GPT2_SIZES:
        raise UsageError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    dest = Path(directory) if directory is not None else default_model_dir(size)
    return _run(lambda ctx: gpt2_remotes(ctx, resolved, size, dest), on_event, policy, want_sha256)
