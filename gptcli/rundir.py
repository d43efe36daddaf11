"""A run directory: crash-consistent checkpoints, the run lock, cleanup of interrupted writes, its
files at the start of a run (run.json, metrics.jsonl), and `RunDirectory`, the directory as one
training process holds it.

    RUN/
      run.json  metrics.jsonl  loss.png  perplexity.png  .lock
      model.safetensors -> checkpoints/latest/model.safetensors
      checkpoints/
        latest -> step-000014
        step-000014/  model.safetensors  trainer.safetensors  trainer.json

A checkpoint is written into `checkpoints/.tmp-*`, every file and the directory fsynced, renamed to
`step-NNNNNN`, and committed by one atomic switch of the `latest` symlink (then the directory is
fsynced). Only then are older checkpoints pruned. A crash at any instant, power loss included,
leaves `latest` on a complete checkpoint; what an interrupted write leaves behind is removed the
next time the run is opened. The top-level `model.safetensors` goes through `latest`, so it
switches with it. Runs from before this layout (the three files at the top level) still resume.
What the checkpoint files hold is `gptcli.trainstate`'s. `runs/latest` points at the newest run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import jsonio
from gptcli.durable import atomic_write_text, current_umask, fsync_path, replace_symlink
from gptcli.errors import GptcliError, UsageError
from gptcli.modelfile import MODEL_FILE
from gptcli.paths import RUNS_DIR
from gptcli.settings import RUN_FILE

if TYPE_CHECKING:
    from gptcli.settings import TrainSettings

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOCK_FILE = ".lock"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
CHECKPOINT_FILES = (MODEL_FILE, TRAINER_FILE, TRAINER_JSON)
KILL_ENV = "GPTCLI_TEST_KILL_AT"
_STEP_DIR = re.compile(r"step-(\d+)")
_save_points = 0


def save_point() -> None:
    """Test hook between the steps of a save: with GPTCLI_TEST_KILL_AT=N in the environment the
    process kills itself (SIGKILL) at the Nth save point, to test crash consistency at every step."""
    global _save_points
    target = os.environ.get(KILL_ENV)
    if not target:
        return
    _save_points += 1
    if _save_points == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def step_of(name: str) -> int | None:
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def check_checkpoints_dir(run_dir: Path) -> None:
    """One line when something other than a directory stands where the run keeps its checkpoints
    (never read as "no checkpoint yet", which would start the run again and rewrite its files)."""
    checkpoints = run_dir / CHECKPOINTS
    if (checkpoints.exists() or checkpoints.is_symlink()) and not checkpoints.is_dir():
        what = "a link to nowhere" if not checkpoints.exists() else "a file"
        raise GptcliError(f"{checkpoints} is {what}, not the run's checkpoint directory; move it away "
                          "(or restore the directory) and try again")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The committed checkpoint directory, or None when no checkpoint was committed."""
    check_checkpoints_dir(run_dir)
    link = run_dir / CHECKPOINTS / LATEST
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    if not target.is_dir():
        raise GptcliError(
            f"{link} points at {target.name}, which is missing; start a new run from the weights of "
            "another checkpoint with --init"
        )
    return target


def checkpoint_to_resume(run_dir: Path) -> Path | None:
    """Where the newest complete checkpoint's files are: the committed one, else (a run from
    before the checkpoints/ layout) the run directory itself, else None."""
    committed = latest_checkpoint(run_dir)
    if committed is not None:
        return committed
    if all((run_dir / name).is_file() and not (run_dir / name).is_symlink() for name in CHECKPOINT_FILES):
        return run_dir
    return None


def kept_after_stop(run_dir: Path | None) -> str:
    """What a run stopped at any instant keeps, read from the directory itself (never assumed)."""
    try:
        checkpoint = checkpoint_to_resume(run_dir) if run_dir is not None and run_dir.is_dir() else None
    except GptcliError:
        checkpoint = None
    if run_dir is None or checkpoint is None:
        return "no checkpoint was saved"
    step = step_of(checkpoint.name)
    which = f" (step {step})" if step is not None else ""
    return f"the last committed checkpoint{which} is kept; continue with: gptcli train --resume {run_dir}"


def write_checkpoint(run_dir: Path, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write one checkpoint's files (each by its `writer(path)`) durably into `step-NNNNNN`;
    not yet committed. On any failure the partial directory is removed."""
    checkpoints = run_dir / CHECKPOINTS
    check_checkpoints_dir(run_dir)
    checkpoints.mkdir(exist_ok=True)
    final = checkpoints / f"step-{step:06d}"
    committed = latest_checkpoint(run_dir)
    if committed is not None and committed.name == final.name:
        # Stopped again before any step: the committed checkpoint already holds this state.
        return final
    if final.exists():  # never committed (opening the run removes those)
        _remove_tree(final)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=checkpoints))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        for name, write in writers.items():
            write(tmp / name)
            save_point()
            fsync_path(tmp / name)
            save_point()
        fsync_path(tmp, directory=True)
        save_point()
        os.rename(tmp, final)
        fsync_path(checkpoints, directory=True)
        save_point()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def commit_checkpoint(run_dir: Path, step_dir: Path) -> None:
    """Make `step_dir` the run's checkpoint: one atomic switch of `checkpoints/latest`. The first
    time, also link the top-level model file through it (and drop an old layout's files)."""
    replace_symlink(run_dir / CHECKPOINTS / LATEST, step_dir.name)
    save_point()
    model_link = run_dir / MODEL_FILE
    target = f"{CHECKPOINTS}/{LATEST}/{MODEL_FILE}"
    if not (model_link.is_symlink() and os.readlink(model_link) == target):
        replace_symlink(model_link, target)
        save_point()
        for name in CHECKPOINT_FILES[1:]:
            (run_dir / name).unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` committed checkpoints (the committed one always stays)."""
    committed = latest_checkpoint(run_dir)
    if committed is None:
        return
    newest = step_of(committed.name)
    steps = sorted(
        s for s in (step_of(p.name) for p in committed.parent.iterdir()) if s is not None and newest is not None
        and s <= newest
    )
    for step in steps[:-keep]:
        _remove_tree(committed.parent / f"step-{step:06d}")


def _remove_tree(path: Path) -> None:
    """Rename first (atomic), then delete: a crash part-way leaves a `.tmp-*` that cleanup removes,
    never a half-deleted checkpoint that looks complete."""
    doomed = path.parent / f".tmp-remove-{path.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    save_point()
    shutil.rmtree(doomed)
    save_point()


def remove_leftovers(run_dir: Path) -> None:
    """Delete what interrupted writes left: temporary files and directories, and checkpoint
    directories that were never committed."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    checkpoints = run_dir / CHECKPOINTS
    if not checkpoints.is_dir():
        return
    committed = latest_checkpoint(run_dir)
    newest = step_of(committed.name) if committed is not None else None
    for entry in checkpoints.iterdir():
        step = step_of(entry.name)
        if entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
        elif step is not None and (newest is None or step > newest):
            shutil.rmtree(entry, ignore_errors=True)


def check_out_path(run_dir: Path) -> None:
    """A usage error when the run directory cannot be one (a file, or inside a file)."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == run_dir else f"is inside {path}, which is a file"
                raise UsageError(f"--out {run_dir} {what}, not a directory")
            return


def create_run_dir(run_dir: Path) -> bool:
    """Create the run directory; True when it did not exist before."""
    check_out_path(run_dir)
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
    return not existed


def lock_run(run_dir: Path) -> int:
    """Hold an exclusive lock on RUN/.lock for as long as this process runs (the kernel releases it
    when the process dies, so a stale lock never blocks). Returns the lock's file descriptor."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise GptcliError(f"cannot write in the run directory {run_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GptcliError(f"{run_dir} is in use by another gptcli train (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock_run(fd: int) -> None:
    os.close(fd)


# --- a run's files ------------------------------------------------------------------------------


def default_run_dir(corpus: str) -> Path:
    stem = Path(corpus).name.split(".")[0] or "corpus"
    return RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


def point_latest(run_dir: Path) -> None:
    """Make runs/latest point at `run_dir` (replaced atomically and durably)."""
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    target = run_dir.resolve()
    if target.parent == RUNS_DIR.resolve():
        target = Path(target.name)  # relative, so the runs directory can move
    replace_symlink(RUNS_DIR / LATEST, str(target))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluations, the one reader of metrics.jsonl. A last line cut short (the process
    died while appending it, so no newline ends it) is dropped, as append-only logs do; a damaged
    line anywhere else is one error naming the file and the line."""
    path = run_dir / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise GptcliError(f"cannot read {path}: {exc.strerror}") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as every complete write does
    metrics = [_metrics_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if torn.strip():
        try:
            metrics.append(_metrics_line(path, len(lines) + 1, torn))
        except GptcliError:
            pass  # the write the process did not finish
    return metrics


def _metrics_line(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(line.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError too
        raise GptcliError(f"{path} is damaged: line {number} is not a JSON evaluation ({exc})") from None
    if not (isinstance(entry, dict) and isinstance(entry.get("step"), int)):
        raise GptcliError(f"{path} is damaged: line {number} is not an evaluation (it needs an integer step)")
    return entry


class RunDirectory:
    """The run directory as one training process holds it: locked while the run trains (rank 0),
    checkpoints committed atomically, `runs/latest` moved after the first commit, and a directory
    this run created removed again when the run fails before its first checkpoint."""

    def __init__(self, path: Path, keep: int, main: bool) -> None:
        self.path, self.keep, self.main = path, keep, main
        self.created = False
        self.lock_fd: int | None = None
        self.saved_step: int | None = None
        self.pointed = False  # runs/latest, moved by this process's first commit

    def open(self, resume: bool) -> Path | None:
        """Create (or find), lock and clean the directory; the checkpoint to resume from, if any."""
        if resume and not self.path.is_dir():
            raise UsageError(f"--resume {self.path}: no such run directory")
        if not self.main:
            return checkpoint_to_resume(self.path) if resume else None
        self.created = create_run_dir(self.path)
        self.lock_fd = lock_run(self.path)
        remove_leftovers(self.path)
        checkpoint = checkpoint_to_resume(self.path)
        if checkpoint is not None and not resume:
            raise UsageError(
                f"{self.path} already holds a run; continue it with --resume {self.path} or pick another --out"
            )
        return checkpoint

    def start(self, settings: TrainSettings, steps_done: int) -> None:
        """run.json, and metrics.jsonl without the evaluations after the checkpoint (the resumed run
        replays them)."""
        atomic_write_text(self.path / RUN_FILE, jsonio.dumps(settings.to_dict(), indent=2) + "\n")
        kept = [m for m in read_metrics(self.path) if m["step"] < steps_done]
        atomic_write_text(self.path / METRICS_FILE, "".join(jsonio.dumps(m) + "\n" for m in kept))

    def kept(self, which: str = "last") -> str:
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"the {which} checkpoint (step {self.saved_step}) is kept"

    def save(self, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
        """Write, commit and prune: the checkpoint of `step`, each file written by its writer."""
        try:
            step_dir = write_checkpoint(self.path, step, writers)
        except Exception as exc:
            raise self._save_error(exc) from None
        commit_checkpoint(self.path, step_dir)
        if not self.pointed:
            point_latest(self.path)
            self.pointed = True
        self.saved_step = step
        prune_checkpoints(self.path, self.keep)
        return step_dir

    def _save_error(self, exc: Exception) -> GptcliError:
        if isinstance(exc, GptcliError):
            return GptcliError(f"cannot save a checkpoint: {exc.message}; {self.kept('last complete')}")
        text = str(exc)
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)) or any(
            sign in text for sign in ("os error 28", "os error 27", "No space left", "File too large")
        )
        if full:  # safetensors reports a failed write as its own error type, not OSError
            return GptcliError(f"the disk is full; {self.kept('last complete')}")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text.splitlines()[0][:100]
        return GptcliError(f"cannot save a checkpoint in {self.path}: {reason}; {self.kept('last complete')}")

    def close(self, failed: bool) -> None:
        # Only the lock holder removes: a process that lost the race for the lock leaves it alone.
        if failed and self.created and self.saved_step is None and self.lock_fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            unlock_run(self.lock_fd)
            self.lock_fd = None
