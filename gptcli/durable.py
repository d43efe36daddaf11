"""Durable writes, the one way gptcli puts a file in place: write a temporary file (or directory)
beside the target, fsync it, rename it over the target atomically, fsync the directory. A crash,
a kill -9 or a full disk at any instant leaves either the old file or the new one, never a mix.

The output-path policy lives here too: gptcli writes only to a new path or, when asked to replace
it, a regular file; never over a device, a pipe or a socket. Temporary files are named
`.<name>.gptcli-<pid>.tmp`, so the leftovers of a killed process are recognised and removed."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from gptcli.errors import UsageError

_TEMP = re.compile(r"\.(?P<name>.+)\.gptcli-(?P<pid>\d+)\.tmp")


def check_output(path: Path, replace: bool, option: str = "--out") -> None:
    """Refuse, with one line, an output path that is not new: unless `replace`, any existing file;
    always a device, pipe, socket or directory standing there."""
    where = f"{option} {path}" if option else str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot write {where}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{where} is a directory")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{where} is not a regular file (a device, pipe or socket); gptcli writes only files")
    if not replace:
        raise UsageError(f"{where} exists; pass --force to replace it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Remove the temporary files (or directories) of `target` left by gptcli processes that died."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def temp_path(target: Path) -> Path:
    """This process's temporary name for `target`, beside it, with older leftovers removed."""
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.gptcli-{os.getpid()}.tmp"
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    return tmp


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
    check_output(path, replace=True, option="")  # the caller decided about replacing; never over a device
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
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
    tmp = temp_path(link)  # per process: two runs moving `runs/latest` at once do not collide
    os.symlink(target, tmp)
    replace(tmp, link)
