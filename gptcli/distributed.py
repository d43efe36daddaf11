"""Distributed training: joining torchrun's process group (`init_distributed`), what the ranks
agree on (`all_agree`), per-rank dropout streams, and `gptcli train --nproc N`: the same command
in N local processes, through torch's own launcher.

`--nproc N` is `torchrun --standalone --nproc-per-node N -m gptcli train ARGS` (without `--nproc`), run
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

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



class PeerLost(GptcliError):
    """Another training process died (killed, out of memory) and took the process group with it:
    the launcher reports that one (`launch`, or torchrun's own report); this one exits without a
    word, instead of the collective's traceback after the launcher's line."""


def check_peers(exc: BaseException, world_size: int) -> None:
    """Raise `PeerLost` when `exc` is a collective failing because another rank is gone."""
    if world_size <= 1 or not isinstance(exc, RuntimeError):
        return
    import torch.distributed

    backend_error = getattr(torch.distributed, "DistBackendError", ())
    signs = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Broken pipe")
    if isinstance(exc, backend_error) or any(sign in str(exc) for sign in signs):
        raise PeerLost(f"another training process failed ({str(exc).splitlines()[0][:120]})") from None


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} CUDA device(s) on this node; "
                "start at most that many processes per node (or use --device cpu)"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank, local_rank, world_size), device


def all_agree(flag: bool, device: str) -> bool:
    """True on every rank when it is True on any (a stop must happen at the same step everywhere, or
    the ranks that go on wait forever for the others' gradients)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rank_dropout_rng(seed: int, dist: Distributed, step: int, device: str) -> Any:
    """With several ranks: the global RNG, for the forward/backward passes of one step, seeded by
    (seed, rank, step), then restored. Dropout masks then differ between ranks (the same stream on
    every rank would repeat one mask across the ranks' sequences) and do not depend on where a run
    was resumed. A single process keeps the chapter's stream."""
    if dist.world_size == 1 or device.split(":")[0] not in ("cpu", "cuda"):
        return nullcontext()
    import numpy as np
    import torch

    @contextmanager
    def seeded() -> Iterator[None]:
        state = int(np.random.SeedSequence([seed, dist.rank, step]).generate_state(1)[0])
        cuda = device.startswith("cuda")
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.default_generator.manual_seed(state)
            if cuda:
                torch.cuda.manual_seed(state)
            yield

    return seeded()


def leave_process_group(dist: Distributed) -> None:
    """Leave torchrun's process group (joined by `init_distributed`) when this process is in one."""
    if dist.world_size > 1:
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
