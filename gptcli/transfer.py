"""Fetching one file: streamed into `<name>.part`, resumed with an HTTP Range request after an
interruption, retried with exponential backoff on connection errors and 5xx answers, verified
(Content-Length, and the known size and sha256 where given) and only then put in place durably.
A file already in place with the right size (and hash, where known) is not fetched again. Local
directories work the same way (mirrors). Nothing here prints: progress goes to a callback as
`FetchEvent`s, which may raise (e.g. KeyboardInterrupt) to stop; the `.part` file then stays."""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gptcli import durable
from gptcli.durable import fsync_path
from gptcli.errors import GptcliError

if TYPE_CHECKING:
    import requests

CHUNK_SIZE = 1 << 20
# Bytes of a network read; what was received of an unfinished read is lost when the connection
# breaks, so this bounds what a resume has to fetch again.
NET_CHUNK_SIZE = 1 << 16
# Bytes at the end of an earlier `.part` fetched again and compared before it is resumed.
RESUME_CHECK = 1 << 12


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
class FetchContext:
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


def is_url(base: str) -> bool:
    return base.startswith(("http://", "https://"))


def join_location(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if is_url(base) else str(Path(base) / relative)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --------------------------------------------------------------------------------------------
# Transfers.


def _transfer_http(ctx: FetchContext, remote: Remote, url: str, part: Path) -> None:
    import requests

    have = part.stat().st_size if part.exists() else 0
    start = max(0, have - RESUME_CHECK)
    headers = {"Range": f"bytes={start}-"} if have else {}
    try:
        response = ctx.http().get(url, headers=headers, stream=True, timeout=ctx.policy.timeout)
    except requests.RequestException as exc:
        raise _Transient(describe_error(exc)) from None
    with response:
        total, chunks, mode = _open_body(response, part, have, start)
        if remote.size is not None and total is not None and total != remote.size:
            part.unlink(missing_ok=True)
            raise _Permanent(f"{total} bytes, but {remote.name} is known to be {remote.size} bytes")
        have = have if mode == "ab" else 0
        ctx.emit(FetchEvent("start", remote.name, url, have, total))
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed connection creates nothing
        with open(part, mode) as handle:
            try:
                for chunk in chunks:
                    handle.write(chunk)
                    have += len(chunk)
                    ctx.emit(FetchEvent("progress", remote.name, url, have, total))
            except requests.RequestException as exc:
                raise _Transient(f"{describe_error(exc)} after {have} bytes") from None
        if total is not None and have != total:
            raise _Transient(f"connection closed after {have} of {total} bytes")


def _open_body(
    response: requests.Response, part: Path, have: int, start: int
) -> tuple[int | None, Iterator[bytes], str]:
    """The file's total size, the chunks still to write and the `.part`'s open mode, from the answer
    to a request for `bytes=start-` (or the whole file when there is no `.part`)."""
    status = response.status_code
    if status >= 500:
        raise _Transient(f"HTTP {status} {response.reason}")
    if status >= 400 and status != 416:
        raise _Permanent(f"HTTP {status} {response.reason}")
    chunks = response.iter_content(NET_CHUNK_SIZE)
    if status in (206, 416) and have:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if status == 416 or not match or int(match.group(1)) != start:
            part.unlink()
            raise _Transient("the server answered the range request with a different range; restarting")
        total = int(match.group(2)) if match.group(2) != "*" else None
        return total, _after_overlap(chunks, part, have, start, total), "ab"
    # A plain 200: the server ignored the Range header (or there was none), so start over.
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None, chunks, "wb"


def _after_overlap(
    chunks: Iterator[bytes], part: Path, have: int, start: int, total: int | None
) -> Iterator[bytes]:
    """The chunks past the `.part`'s end, once the bytes it already holds from `start` on are found
    equal to the source's: a `.part` that was cut, appended to or altered is not resumed."""
    with open(part, "rb") as handle:
        handle.seek(start)
        tail = handle.read()
    received = bytearray()
    for chunk in chunks:
        received += chunk
        if len(received) >= len(tail):
            break
    if (total is not None and have > total) or bytes(received[: len(tail)]) != tail:
        part.unlink()
        raise _Transient("the partial download does not match the file at the source; restarting")
    return itertools.chain([bytes(received[len(tail):])], chunks)


def _transfer_local(ctx: FetchContext, remote: Remote, source: str, part: Path) -> None:
    path = Path(source)
    if not path.is_file():
        raise _Permanent("no such file")
    total = path.stat().st_size
    have = part.stat().st_size if part.exists() else 0
    if have and not _same_tail(part, path, have):
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


def _same_tail(part: Path, source: Path, have: int) -> bool:
    """Whether the last bytes of the `.part` equal the source's at the same place (see _after_overlap)."""
    if have > source.stat().st_size:
        return False
    start = max(0, have - RESUME_CHECK)
    with open(part, "rb") as mine, open(source, "rb") as theirs:
        mine.seek(start)
        theirs.seek(start)
        return mine.read() == theirs.read(have - start)


def describe_error(exc: BaseException) -> str:
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


def _fetch_from(ctx: FetchContext, remote: Remote, url: str, part: Path) -> None:
    """One URL with retries; raises _Permanent/_Transient when this URL is given up."""
    attempt = 0
    while True:
        try:
            if is_url(url):
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
    digest = sha256_file(part)
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
    digest = sha256_file(remote.dest)
    return remote.sha256 is None or digest == remote.sha256, digest


def fetch_one(ctx: FetchContext, remote: Remote, want_sha256: bool = True) -> Fetched:
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
