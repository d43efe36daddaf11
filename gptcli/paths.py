"""Where gptcli keeps files: the cache directory (corpus, tokenizer, downloaded models) and runs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

RUNS_DIR = Path("runs")


def cache_dir() -> Path:
    """`$GPTCLI_HOME`, else `$XDG_CACHE_HOME/gptcli`, else `~/.cache/gptcli`."""
    home = os.environ.get("GPTCLI_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gptcli"


def tokenizer_cache_dir() -> Path:
    return cache_dir() / "tokenizer"


def verdict_cache_path() -> Path:
    return cache_dir() / "data" / "the-verdict.txt"


def check_can_create(path: str | Path) -> None:
    """A one-line usage error when `path` cannot be created because a file stands where one of its
    directories should be (mkdir would say only "File exists")."""
    from gptcli.errors import UsageError

    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot write {path}: {parent} is a file, not a directory")
            return


def broken_link(path: Path) -> str | None:
    """What is wrong with a symbolic link that cannot be followed (a loop, or a target that is gone),
    or None where `path` is no such link."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
        return f"{path} points at {os.readlink(path)}, which does not exist"
    return None


def not_found(path: Path, what: str = "") -> str:
    """The one message for a path that cannot be opened: a broken link named as such, else
    "<what> not found: <path>"."""
    return broken_link(path) or f"{what + ' ' if what else ''}not found: {path}"


def check_not_dangling(path: Path, what: str) -> None:
    """A one-line usage error when `path` is a link that points nowhere (`runs/latest` after its run
    was deleted), instead of a misleading "not found" or "not a run directory"."""
    from gptcli.errors import UsageError

    problem = broken_link(path)
    if problem:
        gone = f" (the {what} it named is gone)" if "does not exist" in problem else ""
        raise UsageError(problem + gone)


def display_path(path: str | Path) -> str:
    """`path` as text that can always be printed and written as UTF-8: bytes of the file name that
    are not UTF-8 (Python keeps them as lone surrogates) are shown as `\\xff` escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
