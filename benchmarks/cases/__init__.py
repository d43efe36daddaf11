"""The benchmark cases, one module per family, by their `--only` names, in the order a run takes them
(start-up first, before anything warms the caches)."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.cases import batched, dtypes, inference, memory, prepare, startup, training
from benchmarks.harness import Suite

CASES: dict[str, Callable[[Suite], None]] = {
    "startup": startup.run,
    "train": training.run,
    "memory": memory.run,
    "inference": inference.run,
    "batched": batched.run,
    "dtypes": dtypes.run,
    "prepare": prepare.run,
}
