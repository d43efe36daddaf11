"""Run several `gptcli` commands as forked children of one process that imported gptcli and torch
once (spawning a fresh interpreter per command would take seconds each). Each child is a real
process: `GPTCLI_TEST_KILL_AT` makes it SIGKILL itself at a save point.

Usage: python tests/forkrun.py JOBS_JSON  (a list of {"args": [...], "kill_at": N or null});
prints one JSON list of {"signal": N or null, "code": N or null, "stderr": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def run_job(args: list[str], kill_at: int | None) -> dict[str, object]:
    from gptcli.cli import app
    from gptcli.rundir import KILL_ENV

    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        os.dup2(err.fileno(), 2)
        os.environ.pop(KILL_ENV, None)
        if kill_at is not None:
            os.environ[KILL_ENV] = str(kill_at)
        code = 0
        try:
            app(args, prog_name="gptcli")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report, never continue the parent's loop in the child
            import traceback

            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return {"signal": signal, "code": code, "stderr": stderr}


def main() -> None:
    import torch

    torch.set_num_threads(1)  # no thread pool in the parent: forking after one was used is unsafe
    # Everything a training run imports lazily, loaded once here and shared by every child.
    import safetensors.torch  # noqa: F401

    import gptcli.data
    import gptcli.train
    import gptcli.ui  # noqa: F401
    from gptcli.optim import adamw
    from gptcli.tokenizer import get_tokenizer

    adamw([torch.zeros(1, requires_grad=True)], lr=1e-3, weight_decay=0.1)  # imports torch's compiler stack
    get_tokenizer()
    jobs = json.loads(sys.argv[1])
    print(json.dumps([run_job(job["args"], job.get("kill_at")) for job in jobs]))


if __name__ == "__main__":
    main()
