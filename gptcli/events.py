"""What a training run reports: `gptcli.train.train` yields these events and never prints; the
`train` command shows them (`gptcli.ui`) and feeds them to the experiment loggers (`gptcli.loggers`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptcli.config import GPTConfig
    from gptcli.settings import TrainSettings


@dataclass
class RunStarted:
    out_dir: Path
    device: str
    config: GPTConfig
    parameters: int
    train_tokens: int
    val_tokens: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    world_size: int
    settings: TrainSettings
    precision: str  # what runs: --precision auto resolved, or bf16 fallen back to fp32


@dataclass
class StepDone:
    epoch: int
    step: int
    tokens_seen: int
    loss: float
    lr: float
    tokens_per_second: float
    grad_norm: float  # the global gradient norm before clipping (for the experiment loggers)


@dataclass
class Evaluation:
    """One line of metrics.jsonl."""

    epoch: int
    step: int
    tokens_seen: int
    train_loss: float
    val_loss: float
    train_ppl: float
    val_ppl: float
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Sample:
    epoch: int
    step: int
    text: str


@dataclass
class Notice:
    """Something the user should know that does not stop the run."""

    text: str


@dataclass
class CheckpointSaved:
    path: Path
    step: int


@dataclass
class RunFinished:
    reason: str  # "completed", "max_steps" or "interrupted"
    out_dir: Path
    steps: int
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    best_val_loss: float | None
    final: Evaluation | None = None
    files: list[Path] = field(default_factory=list)


Event = RunStarted | StepDone | Evaluation | Sample | Notice | CheckpointSaved | RunFinished
