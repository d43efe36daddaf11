"""`gptcli train --nproc N`: the same command in N local processes, through torch's own launcher.

This is `torchrun --standalone --nproc-per-node N -m gptcli train ARGS` (without `--nproc`), run
in-process with `torch.distributed.run` so that the exit code is the one the training processes
chose (2 for bad usage, 3 for a diverged loss, 130 for Ctrl-C) instead of torchrun's generic 1, and
without torchrun's failure report: each process has already said what went wrong, on one line.
`--standalone` lets the launcher pick a free port, so several runs can share a machine. For several
machines use torchrun itself (see the README).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from gptcli.errors import GptcliError, UsageError

NPROC_OPTION = "--nproc"


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """The command's arguments (argv without the program) without `--nproc N` / `--nproc=N`."""
    args: list[str] = []
    skip = False
    for arg in list(argv)[1:]:
        if skip:
            skip = False
        elif arg == NPROC_OPTION:
            skip = True
        elif not arg.startswith(NPROC_OPTION + "="):
            args.append(arg)
    return args


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun's command line (after `torchrun`) that runs argv's gptcli command in nproc processes."""
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "gptcli", *strip_nproc(argv)]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run argv's `gptcli train` command (argv[0] is the program) in `nproc` local processes under
    torch's elastic launcher, wait for them, and return the exit code: 0, or that of the first
    process that failed. A process killed by a signal is an error (exit code 128 + signal)."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun would set 1 thread per process (with a warning); share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if "LOGLEVEL" not in os.environ:
        # The processes report their own errors on one line; keep the launcher's log lines about
        # the same failure (each module's logger has its own level) out of the way.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
                logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.get_args_parser().parse_args(torchrun_args(nproc, argv))
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            raise GptcliError(f"training process {rank} was killed by {failure.signal_name()}",
                              128 - failure.exitcode) from None
        return failure.exitcode or 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    finally:
        sys.stdout.flush()
    return 0
