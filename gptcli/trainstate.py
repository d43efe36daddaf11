"""What a checkpoint holds beyond the model: the optimizer's state and the RNG states as tensors
(`trainer.safetensors`), and where the run is (`Position`, in `trainer.json`), all carrying the
step; `load_checkpoint` restores a run from them, refusing files that are missing, damaged or of
different steps. Where the files go, and how they are committed, is `gptcli.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import __version__, jsonio
from gptcli.config import GPTConfig
from gptcli.errors import GptcliError
from gptcli.modelfile import MODEL_FILE, load_weights
from gptcli.rundir import TRAINER_FILE, TRAINER_JSON

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT


@dataclass
class Position:
    """Where the run is: optimizer steps done, the epoch, the batch within it and its order seed."""

    steps_done: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_seed: int | None = None
    tokens_seen: int = 0
    best_val_loss: float | None = None
    precision: str | None = None  # what ran (--precision auto, or bf16 fallen back to fp32), for the record


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into tensors (for safetensors) and JSON-able rest."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    import torch

    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    import torch

    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def checkpoint_writers(
    model: GPT, optimizer: torch.optim.Optimizer, position: Position
) -> dict[str, Callable[[Path], None]]:
    """How to write each file of a checkpoint (model last: `sample` needs only it). All carry the
    step, and resume refuses files whose steps disagree (hand-edited or mixed checkpoints)."""
    from gptcli.modelfile import write_model, write_tensors

    tensors, meta = optimizer_tensors(optimizer)
    tensors.update(rng_tensors())
    state = {**dataclasses.asdict(position), "optimizer": meta, "gptcli_version": __version__}
    step = {"step": str(position.steps_done)}
    return {
        TRAINER_FILE: lambda path: write_tensors(path, tensors, step),
        TRAINER_JSON: lambda path: path.write_text(jsonio.dumps(state, indent=2) + "\n", encoding="utf-8"),
        MODEL_FILE: lambda path: write_model(path, model, step),
    }


def _damaged(path: Path, what: str) -> GptcliError:
    """The checkpoint cannot be resumed; suggest --init with its model file only where one exists."""
    model = (path if path.is_dir() else path.parent) / MODEL_FILE
    example = f" (e.g. --init {model}, if that file is intact)" if model != path and model.is_file() else ""
    return GptcliError(f"cannot resume: {path} {what}; start a new run from saved weights with --init{example}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as exc:
        raise _damaged(path, f"is damaged or truncated ({str(exc).splitlines()[0][:80]})") from None


def _read_trainer_json(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, "is missing") from None
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"is not valid JSON ({exc})") from None
    required = {"steps_done", "epoch", "batch_in_epoch", "tokens_seen", "optimizer"}
    if not isinstance(state, dict) or not required <= state.keys():
        raise _damaged(path, f"is not a trainer state (it needs the keys {', '.join(sorted(required))})")
    return state


def _check_same_model(config: GPTConfig, model_meta: dict[str, str], checkpoint: Path) -> None:
    """The model run.json describes is the one the checkpoint holds: an edited run.json is named as
    such, not blamed on the checkpoint."""
    try:
        saved = GPTConfig.from_dict(json.loads(model_meta["config"]))
    except (KeyError, ValueError, GptcliError):
        return  # no readable config in the file: load_weights judges the tensors themselves
    changed = [f"{name} {getattr(saved, name)!r} in the checkpoint, {getattr(config, name)!r} in run.json"
               for name in dataclasses.asdict(config) if getattr(saved, name) != getattr(config, name)]
    if changed:
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        run_json = run_dir / "run.json"
        raise GptcliError(f"cannot resume: {run_json} describes another model than {checkpoint} holds "
                          f"({'; '.join(changed)}); was run.json edited? restore those values to resume")


def load_checkpoint(checkpoint: Path, model: GPT, optimizer: torch.optim.Optimizer) -> Position:
    """Restore the model, optimizer and RNG states from a checkpoint directory; where the run was."""
    state = _read_trainer_json(checkpoint / TRAINER_JSON)
    tensors, trainer_meta = _read_safetensors(checkpoint / TRAINER_FILE)
    weights, model_meta = _read_safetensors(checkpoint / MODEL_FILE)
    steps = (str(state["steps_done"]), trainer_meta.get("step"), model_meta.get("step"))
    if len(set(steps)) != 1:
        raise _damaged(checkpoint, f"holds files of different steps (trainer.json {steps[0]}, "
                                   f"trainer.safetensors {steps[1]}, model.safetensors {steps[2]})")
    _check_same_model(model.config, model_meta, checkpoint)
    load_weights(model, weights, checkpoint / MODEL_FILE)
    try:
        restore_optimizer(optimizer, tensors, state["optimizer"])
        restore_rng(tensors)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _damaged(checkpoint / TRAINER_FILE, f"does not fit the model ({type(exc).__name__}: {exc})") from None
    fields = {f.name for f in dataclasses.fields(Position)}
    return Position(**{k: v for k, v in state.items() if k in fields})
