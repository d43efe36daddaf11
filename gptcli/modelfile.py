"""Model files: safetensors weights with the model config in their metadata, written atomically.

A "model" on the command line is a `.safetensors` file or a run directory holding
`model.safetensors`; no model given means the latest run (`runs/latest`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.config import GPTConfig, model_shapes
from gptcli.durable import atomic_write, current_umask
from gptcli.errors import GptcliError
from gptcli.paths import RUNS_DIR, not_found

if TYPE_CHECKING:
    import torch

    from gptcli.model import GPT

MODEL_FILE = "model.safetensors"
FORMAT = "gptcli"


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file in place (callers that need atomicity use a temporary path)."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(contiguous, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates its files 0600; gptcli's follow the umask


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: write_tensors(tmp, tensors, metadata))


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict without the tied head (safetensors stores each tensor once)."""
    state = dict(model.state_dict())
    if model.config.tie_weights:
        state.pop("out_head.weight", None)
    return state


def write_model(path: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> None:
    """Write a model file in place: the weights, and the config and `extra` in its metadata."""
    metadata = {"format": FORMAT, "config": model.config.to_json()}
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    write_tensors(path, model_state_for_saving(model), metadata)


def save_model(path: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> None:
    atomic_write(path, lambda tmp: write_model(tmp, model, extra))


def resolve_model_path(spec: str | Path | None) -> Path:
    """A `.safetensors` file from a file, a run directory, or (None) the latest run."""
    if spec is None:
        latest = RUNS_DIR / "latest"
        if not latest.exists():
            raise GptcliError(
                "no model given and no training run found (runs/latest); train one with "
                "`gptcli train`, or pass --model RUN_DIR or a .safetensors file "
                "(e.g. from `gptcli convert`)"
            )
        spec = latest
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise GptcliError(not_found(path, "model") if not path.exists() else f"{path} is not a regular file")
    return path


GGUF_MAGIC = b"GGUF"


def check_model_file(path: str | Path) -> None:
    """One clear line for files that are not safetensors at all, before safetensors reads a bogus
    header size from their first bytes (a GGUF file would be "header too large")."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise GptcliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise GptcliError(
            f"{path} is not a readable safetensors file (it is empty: 0 bytes; was it written completely?)"
        )
    if head == GGUF_MAGIC:
        # `gptcli convert` writes GGUF (--to gguf) but does not read it (gptcli.formats.registry.READERS).
        raise GptcliError(
            f"{path} is a GGUF file (llama.cpp's format): gptcli writes GGUF for llama.cpp but reads only "
            "safetensors model files; `gptcli convert` reads OpenAI checkpoints, Hugging Face models, gptcli "
            "and book (the chapter's) safetensors files"
        )


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A safetensors file's metadata and tensor shapes, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    check_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            return dict(handle.metadata() or {}), shapes
    except Exception as exc:
        raise GptcliError(f"{path} is not a readable safetensors file ({exc})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    return read_header(path)[0]


def check_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """The file's tensors are exactly what `config` builds; checked before the model is allocated."""
    if config.n_layers > len(shapes):  # checked first: a claim of 2**40 layers is not listed out
        raise _mismatch(config, source, f"it holds {len(shapes)} tensors in all")
    expected = model_shapes(config)
    if config.tie_weights and "out_head.weight" in shapes:  # a tied head stored anyway: must fit
        expected["out_head.weight"] = (config.vocab_size, config.emb_dim)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [name for name in expected if name in shapes and shapes[name] != expected[name]]
    if mismatched:
        name = mismatched[0]
        needs = f"{name} has shape {list(shapes[name])}, the config needs {list(expected[name])}"
        raise _mismatch(config, source, needs)
    if missing or unexpected:
        raise _mismatch(config, source, f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")


def _mismatch(config: GPTConfig, source: str | Path, detail: str) -> GptcliError:
    return GptcliError(
        f"{source}: the model config in its metadata does not match its tensors ({detail}; config "
        f"{config.n_layers} layers, emb_dim {config.emb_dim}, vocab {config.vocab_size}, "
        f"context {config.context_length})"
    )


def _config_from_metadata(metadata: dict[str, str], path: str | Path) -> GPTConfig:
    if "config" not in metadata:
        raise GptcliError(
            f"{path} has no gptcli model config in its metadata; convert foreign weights with `gptcli convert`"
        )
    try:
        return GPTConfig.from_json(metadata["config"])
    except GptcliError as exc:
        raise GptcliError(f"{path}: bad model config in its metadata: {exc.message}") from None


def load_config(path: str | Path) -> GPTConfig:
    """The model config stored in a gptcli model file, checked against the file's tensor shapes."""
    metadata, shapes = read_header(path)
    config = _config_from_metadata(metadata, path)
    check_shapes(config, shapes, path)
    return config


def load_model(
    spec: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPT, Path]:
    """The model at `spec` (see `resolve_model_path`) in eval mode, and the file it came from."""
    import torch
    from safetensors.torch import load_file

    from gptcli.model import GPT

    path = resolve_model_path(spec)
    config = load_config(path)  # checked against the file's shapes: no allocation for a lying config
    with torch.device("meta"), _without_initialisation():  # the file's weights follow
        model = GPT(config)
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors' own error types, e.g. for a truncated file
        raise GptcliError(f"{path} is not a readable safetensors file ({exc})") from None
    load_weights(model, state, path, assign=True)
    model.to(device=device, dtype=dtype or torch.float32).eval()  # float32 whatever the file holds
    return model, path


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
"""What torch's layers call to initialise themselves (nn.Linear, nn.Embedding, nn.LayerNorm)."""


@contextlib.contextmanager
def _without_initialisation() -> Iterator[None]:
    """torch.nn.init's functions as no-ops while a model whose weights are loaded next is built
    (transformers' `no_init_weights` does the same): a random initialisation costs 0.8 s at 124M, and
    on the meta device torch's `normal_` imports torch._dynamo, another 1.3 s of start-up."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(init, name, _keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str | Path, assign: bool = False) -> None:
    """Load a gptcli state dict, with a clear error when it does not fit the model. `assign`: the
    model takes the state's tensors as its parameters (a model built on the meta device)."""
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {"out_head.weight"})
    if missing or unexpected:
        raise GptcliError(
            f"{source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise GptcliError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: state[k] for k in expected}, strict=not model.config.tie_weights, assign=assign)
    if model.config.tie_weights:  # assigning replaced the shared parameter: share the loaded one again
        model.out_head.weight = model.tok_emb.weight
