"""Durable writes, the one way gptcli puts a file in place: write a temporary file (or directory)
beside the target, fsync it, rename it over the target atomically, fsync the directory. A crash,
a kill -9 or a full disk at any instant leaves either the old file or the new one, never a mix."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(source: Path, target: Path) -> None:
    """Rename a finished, fsynced `source` over `target`; the rename survives a power loss only once
    the directory is synced too."""
    os.replace(source, target)
    fsync_path(target.parent, directory=True)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then put it in place durably.

    A crash or Ctrl-C part-way leaves the previous file untouched and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (a new link renamed over the old), durably."""
    tmp = link.parent / f".{link.name}.link.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    replace(tmp, link)
