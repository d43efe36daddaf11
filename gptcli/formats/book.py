"""The book's own model files: the chapter's `GPTModel` state dict, both ways.

Reading: `torch.save(model.state_dict(), "model.pth")` and the chapter's `model_and_optimizer.pth`
(`{"model_state_dict": ..., "optimizer_state_dict": ...}`), or a `.safetensors` file with the
chapter's keys (what `--to book` writes). A `.pth` is a pickle, so it is read only with
`torch.load(weights_only=True)`: torch's restricted unpickler, which builds tensors and plain
containers and refuses every other class, so loading cannot run code. The config comes from the
shapes; the number of heads is not in the shapes, so it comes from `--n-heads`, the file's
`GPT_CONFIG` metadata, or GPT-2's widths (768: 12, 1024: 16, 1280: 20, 1600: 25).

The optimizer state of `model_and_optimizer.pth` is not converted: gptcli's `train --init` starts a
fresh AdamW. Its step count is kept in the output's metadata (`book_optimizer_steps`).

Writing: exactly the chapter's keys and shapes, including each block's `att.mask` buffer (the
causal mask the chapter registers), so that `GPTModel(cfg).load_state_dict(load_file(path))` works
with `strict=True`. A tied head is written as a copy in `out_head.weight`, as the chapter has one.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptcli.config import GPTConfig, model_shapes
from gptcli.durable import atomic_write
from gptcli.errors import GptcliError, UsageError
from gptcli.formats.plan import (
    ConversionPlan,
    Description,
    ProgressCallback,
    ReadOptions,
    TensorPlan,
    WriteOptions,
)
from gptcli.formats.safetensors_io import write_safetensors_stream

NAME = "book"
BOOK_DROP_RATE = 0.1  # the chapter's GPT_CONFIG_124M
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # GPT-2's released widths -> heads
CONFIG_METADATA = "GPT_CONFIG"
QKV = ("query", "key", "value")


def book_config_dict(config: GPTConfig) -> dict[str, Any]:
    """The chapter's GPT_CONFIG dict for a model of `config`."""
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    return {key: getattr(config, key) for key in keys}


def _block_pairs(i: int) -> list[tuple[str, str]]:
    """(chapter name, gptcli name) of block i's parameters other than the query/key/value ones."""
    c, g = f"trf_blocks.{i}.", f"blocks.{i}."
    pairs = [
        (c + "att.out_proj.weight", g + "att.out_proj.weight"),
        (c + "att.out_proj.bias", g + "att.out_proj.bias"),
        (c + "ff.layers.0.weight", g + "ff.fc.weight"),
        (c + "ff.layers.0.bias", g + "ff.fc.bias"),
        (c + "ff.layers.2.weight", g + "ff.proj.weight"),
        (c + "ff.layers.2.bias", g + "ff.proj.bias"),
    ]
    for norm in ("norm1", "norm2"):
        pairs += [(c + f"{norm}.scale", g + f"{norm}.weight"), (c + f"{norm}.shift", g + f"{norm}.bias")]
    return pairs


def _gptcli_pairs(n_layers: int) -> list[tuple[str, str]]:
    """(chapter name, gptcli name) of every parameter but the query/key/value projections."""
    pairs = [(n, n) for n in ("tok_emb.weight", "pos_emb.weight", "out_head.weight")]
    pairs += [("final_norm.scale", "final_norm.weight"), ("final_norm.shift", "final_norm.bias")]
    for i in range(n_layers):
        pairs += _block_pairs(i)
    return pairs


def book_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The chapter's state dict in its order: gptcli's shapes renamed, the fused query/key/value
    projection split in three, and the `att.mask` buffers."""
    ours = model_shapes(config.replace(tie_weights=False))
    pairs = dict(_gptcli_pairs(config.n_layers))
    ctx = config.context_length
    shapes = {name: ours[pairs[name]] for name in ("tok_emb.weight", "pos_emb.weight")}
    for i in range(config.n_layers):
        shapes[f"trf_blocks.{i}.att.mask"] = (ctx, ctx)
        for part in QKV:
            for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
                fused = ours[f"blocks.{i}.att.qkv.{kind}"]
                shapes[f"trf_blocks.{i}.att.W_{part}.{kind}"] = (fused[0] // 3, *fused[1:])
        shapes.update({book: ours[gptcli] for book, gptcli in _block_pairs(i)})
    shapes.update({name: ours[pairs[name]] for name in ("final_norm.scale", "final_norm.shift", "out_head.weight")})
    return shapes


# --------------------------------------------------------------------------------------------
# Reading.


class BookSource:
    """The chapter's tensors from a `.pth` (held in memory) or a `.safetensors` file (read lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.optimizer_steps: int | None = None
        self._state: dict[str, Any] | None = None
        if path.suffix == ".safetensors":
            self.shapes = self._open_safetensors()
        else:
            self._state = _load_pth(path, self)
            self.shapes = {name: tuple(t.shape) for name, t in self._state.items()}

    def _open_safetensors(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                self.metadata = dict(handle.metadata() or {})
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as exc:
            raise GptcliError(f"{self.path} is not a readable safetensors file ({exc})") from None

    def dtype(self, name: str) -> str:
        """The stored dtype of `name` (torch's name without the `torch.` prefix)."""
        if self._state is not None:
            return str(self._state[name].dtype).removeprefix("torch.")
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return str(handle.get_slice(name).get_dtype())

    def load(self, name: str) -> np.ndarray:
        import torch

        if self._state is not None:
            tensor = self._state[name]
        else:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        return tensor.detach().to(torch.float32).contiguous().numpy()


def _load_pth(path: Path, source: BookSource) -> dict[str, Any]:
    """The model state dict of a `.pth`, loaded with torch's restricted (weights-only) unpickler."""
    import torch

    if not path.is_file():
        raise GptcliError(f"not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GptcliError(f"{path}: refused: {_refusal(str(exc))}; gptcli loads only tensors "
                          "(torch.load weights_only=True)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GptcliError(f"{path}: not a readable torch file, truncated or corrupt ({first})") from None
    if isinstance(obj, dict) and "model_state_dict" in obj:
        source.optimizer_steps = _optimizer_steps(obj.get("optimizer_state_dict"))
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise GptcliError(f"{path}: not a state dict (expected a dict of tensors, as model.state_dict() gives)")
    return obj


def _refusal(message: str) -> str:
    """What torch's weights-only unpickler refused, from its (long) message."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
    if found:
        return f"the pickle holds {found.group(1)}, not just tensors"
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    reason = detail.group(1) if detail else "unpickling failed"
    return f"not a torch state dict, or one that needs more than tensors ({reason})"


def _optimizer_steps(state: Any) -> int | None:
    """AdamW's step count from an optimizer state dict (None when it has none)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return None
    found = [v.get("step") for v in state["state"].values() if isinstance(v, dict)]
    steps = [int(s) for s in found if s is not None]
    return max(steps) if steps else None


def infer_config(source: BookSource, n_heads: int | None = None) -> GPTConfig:
    """The model config from the tensor shapes (and the file's GPT_CONFIG metadata, when present)."""
    shapes, where = source.shapes, source.path
    for name in ("tok_emb.weight", "pos_emb.weight", "trf_blocks.0.att.W_query.weight"):
        if name not in shapes:
            raise GptcliError(f"{where}: not the chapter's GPTModel state dict (no {name})")
    vocab, emb = shapes["tok_emb.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"trf_blocks\.(\d+)\.", k)))
    stored = _stored_config(source)
    heads = n_heads or stored.get("n_heads") or GPT2_HEADS.get(emb)
    if heads is None:
        raise UsageError(
            f"{where}: the number of attention heads is not in the file and emb_dim {emb} is not a GPT-2 "
            "width (768/1024/1280/1600); pass --n-heads"
        )
    try:
        return GPTConfig(
            vocab_size=vocab,
            context_length=shapes["pos_emb.weight"][0],
            emb_dim=emb,
            n_heads=int(heads),
            n_layers=layers,
            drop_rate=float(stored.get("drop_rate", BOOK_DROP_RATE)),
            qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
            tie_weights=_head_is_tied(source),
        )
    except GptcliError as exc:
        raise GptcliError(f"{where}: {exc.message}") from None


def _stored_config(source: BookSource) -> dict[str, Any]:
    text = source.metadata.get(CONFIG_METADATA)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise GptcliError(f"{source.path}: its {CONFIG_METADATA} metadata is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def _head_is_tied(source: BookSource) -> bool:
    """A head equal to the token embedding (the chapter assigns GPT-2's wte to both) is tied."""
    if "out_head.weight" not in source.shapes:
        return True
    if source.shapes["out_head.weight"] != source.shapes["tok_emb.weight"]:
        return False
    return bool(np.array_equal(source.load("out_head.weight"), source.load("tok_emb.weight")))


def _check_keys(source: BookSource, config: GPTConfig) -> None:
    expected = book_shapes(config)
    optional = {k for k in expected if k.endswith(".att.mask")}  # buffers, recomputed by gptcli
    if config.tie_weights:
        optional.add("out_head.weight")
    missing = sorted(set(expected) - set(source.shapes) - optional)
    unexpected = sorted(set(source.shapes) - set(expected))
    if missing or unexpected:
        raise GptcliError(
            f"{source.path}: not the chapter's GPTModel state dict: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for name, shape in source.shapes.items():
        if tuple(shape) != expected[name]:
            raise GptcliError(f"{source.path}: {name} has shape {list(shape)}, expected {list(expected[name])}")


def read_plan(path: Path, options: ReadOptions) -> ConversionPlan:
    """A conversion plan reading the chapter's state dict (`.pth` or chapter-keyed `.safetensors`)."""
    source = BookSource(path)
    config = infer_config(source, options.n_heads)
    _check_keys(source, config)
    from_book = {g: c for c, g in _gptcli_pairs(config.n_layers)}
    tensors = []
    for name, shape in model_shapes(config).items():
        fused = re.match(r"blocks\.(\d+)\.att\.qkv\.(weight|bias)$", name)
        if fused:
            parts = [f"trf_blocks.{fused.group(1)}.att.W_{p}.{fused.group(2)}" for p in QKV]
            tensors.append(TensorPlan(name, shape, _concat_loader(source, parts)))
        else:
            tensors.append(TensorPlan(name, shape, _named_loader(source, from_book[name])))
    plan = ConversionPlan(config, tensors, str(path), NAME)
    if source.optimizer_steps is not None:
        plan.extra["book_optimizer_steps"] = str(source.optimizer_steps)
        plan.notes.append(
            f"the optimizer state (AdamW after {source.optimizer_steps} steps) is not converted; "
            "train --init starts a fresh optimizer"
        )
    return plan


def _concat_loader(source: BookSource, parts: list[str]) -> Callable[[], np.ndarray]:
    return lambda: np.concatenate([source.load(p) for p in parts])


def _named_loader(source: BookSource, name: str) -> Callable[[], np.ndarray]:
    return lambda: source.load(name)


def is_book_safetensors(path: Path) -> bool:
    """A `.safetensors` file with the chapter's keys (not a gptcli or Hugging Face one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return "trf_blocks.0.att.W_query.weight" in handle.keys()
    except Exception:
        return False


def detect(path: Path) -> bool:
    """A `.pth`/`.pt` file, or a `.safetensors` file with the chapter's keys."""
    if not path.is_file():
        return False
    return path.suffix in (".pth", ".pt") or (path.suffix == ".safetensors" and is_book_safetensors(path))


def describe(path: Path, options: ReadOptions) -> Description:
    source = BookSource(path)
    config = infer_config(source, options.n_heads)
    origin: dict[str, Any] = {"source": "the book's GPTModel state dict"}
    if source.optimizer_steps is not None:
        origin["optimizer_steps"] = source.optimizer_steps
    dtypes = sorted({source.dtype(name) for name in source.shapes})
    return Description(config, [path], dtypes, origin)


# --------------------------------------------------------------------------------------------
# Writing.


def _book_tensors(plan: ConversionPlan) -> list[TensorPlan]:
    """The plan's tensors under the chapter's names, in the chapter's state-dict order."""
    config = plan.config
    by_name = {t.name: t for t in plan.tensors}
    to_gptcli = dict(_gptcli_pairs(config.n_layers))
    if "out_head.weight" not in by_name:  # tied: the chapter's model has the head as its own tensor
        to_gptcli["out_head.weight"] = "tok_emb.weight"
    out = []
    for name, shape in book_shapes(config).items():
        split = re.match(r"trf_blocks\.(\d+)\.att\.W_(query|key|value)\.(weight|bias)$", name)
        if name.endswith(".att.mask"):
            load = _mask_loader(config.context_length)
        elif split:
            fused = by_name[f"blocks.{split.group(1)}.att.qkv.{split.group(3)}"]
            load = _split_loader(fused.load, QKV.index(split.group(2)))
        else:
            load = by_name[to_gptcli[name]].load
        out.append(TensorPlan(name, shape, load))
    return out


def _mask_loader(ctx: int) -> Callable[[], np.ndarray]:
    """The chapter's causal mask buffer: 1 above the diagonal (float32, as torch.triu(ones) gives)."""
    return lambda: np.triu(np.ones((ctx, ctx), dtype=np.float32), k=1)


def _split_loader(load_fused: Callable[[], np.ndarray], part: int) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(np.split(load_fused(), 3)[part])


def write(plan: ConversionPlan, out: Path, options: WriteOptions, on_tensor: ProgressCallback | None = None) -> Path:
    """Write `plan` as a safetensors file with exactly the chapter's keys and shapes, atomically."""
    if out.suffix != ".safetensors":
        raise UsageError(f"--to book writes a .safetensors file (load it with safetensors' load_file); got {out}")
    tensors = _book_tensors(plan)
    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(book_config_dict(plan.config))}
    names = {t.name: t.name for t in tensors}
    atomic_write(out, lambda tmp: write_safetensors_stream(tmp, tensors, metadata, names, on_tensor))
    return out
