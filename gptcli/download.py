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

A mirror may hold other files than OpenAI's (test fixtures): one with a SHA256SUMS is checked against
it (and the Content-Length); one without is held to the known sizes and hashes of the official files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptcli.choices import GPT2_SIZES
from gptcli.durable import check_output
from gptcli.errors import GptcliError, UsageError
from gptcli.paths import cache_dir, check_can_create, tokenizer_cache_dir, verdict_cache_path
from gptcli.tokenizer import ENCODER_JSON, ENCODER_JSON_SHA256, VOCAB_BPE, VOCAB_BPE_SHA256
from gptcli.transfer import (
    EventCallback,
    FetchContext,
    Fetched,
    Remote,
    RetryPolicy,
    describe_error,
    fetch_one,
    is_url,
    join_location,
)

if TYPE_CHECKING:
    pass

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
        base = base.rstrip("/") if is_url(base) else str(Path(base).expanduser())
        if not is_url(base) and not Path(base).is_dir():
            raise UsageError(f"mirror {base} is neither an http(s):// URL nor an existing directory")
        return cls((base,), (join_location(base, "encodings"),), (base,), official=False, root=base)


DEFAULT_ORIGINS = Origins()


def resolve_origins(mirror: str | None = None, origins: Origins | None = None) -> Origins:
    """`mirror`, else `$GPTCLI_MIRROR`, else `origins`, else the official URLs."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror:
        return Origins.mirror(mirror)
    return origins or DEFAULT_ORIGINS


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


# --------------------------------------------------------------------------------------------
# What to fetch.


def _mirror_sums(ctx: FetchContext, base: str) -> dict[str, str] | None:
    """The mirror's SHA256SUMS as {relative path: sha256}, or None when it has none."""
    if base in ctx.sums_cache:
        return ctx.sums_cache[base]
    url = join_location(base, SHA256SUMS)
    text: str | None = None
    if is_url(base):
        import requests

        try:
            response = ctx.http().get(url, timeout=ctx.policy.timeout)
        except requests.RequestException as exc:
            raise GptcliError(f"cannot reach the mirror: {url}: {describe_error(exc)}") from None
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


def _remote(
    ctx: FetchContext, origins: Origins, bases: tuple[str, ...], relative: str, name: str, dest: Path
) -> Remote:
    """`relative` is the path below each base; `name` the path below a mirror's root."""
    urls = tuple(join_location(base, relative) for base in bases)
    sums = _mirror_sums(ctx, origins.root) if origins.root and not origins.official else None
    if sums is None:  # official URLs, or a mirror that says nothing: what gptcli knows of the file
        return Remote(name, urls, dest, KNOWN_SIZES.get(name), KNOWN_SHA256.get(name))
    # A mirror's own SHA256SUMS wins: it may hold other files under these names (small fixtures).
    return Remote(name, urls, dest, None, sums.get(name))


def verdict_remote(ctx: FetchContext, origins: Origins, dest: Path) -> Remote:
    return _remote(ctx, origins, origins.verdict, VERDICT_FILE, VERDICT_FILE, dest)


def tokenizer_remotes(ctx: FetchContext, origins: Origins, directory: Path) -> list[Remote]:
    return [
        _remote(ctx, origins, origins.encodings, name, f"encodings/{name}", directory / name)
        for name in (ENCODER_JSON, VOCAB_BPE)
    ]


def gpt2_remotes(ctx: FetchContext, origins: Origins, size: str, directory: Path) -> list[Remote]:
    if size not in GPT2_SIZES:
        raise UsageError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    return [
        _remote(ctx, origins, origins.models, f"{size}/{name}", f"{size}/{name}", directory / name)
        for name in GPT2_FILES
    ]


def default_model_dir(size: str) -> Path:
    return cache_dir() / "models" / size


def _run(
    remotes_for: Callable[[FetchContext], list[Remote]],
    on_event: EventCallback | None,
    policy: RetryPolicy | None,
    want_sha256: bool,
) -> list[Fetched]:
    ctx = FetchContext(on_event, policy or RetryPolicy())
    try:
        remotes = remotes_for(ctx)
        for remote in remotes:
            check_can_create(remote.dest)
            check_output(remote.dest, replace=True, option="")  # a complete file is skipped, a wrong one replaced
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
