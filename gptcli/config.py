"""Model configuration: the chapter's fields, GPT-2's presets, and JSON (de)serialisation."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from gptcli.errors import UsageError


@dataclass(frozen=True)
class GPTConfig:
    """The chapter's GPT_CONFIG fields, plus weight tying (off, as in the chapter)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise UsageError(f"emb-dim ({self.emb_dim}) must be divisible by n-heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise UsageError(f"drop-rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with the given fields changed; `None` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """A config from stored JSON: unknown fields and wrong types are errors, not surprises later."""
        if not isinstance(data, dict):
            raise UsageError(f"the model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(f"unknown model config field(s): {', '.join(unknown)}")
        for name, value in data.items():
            if not _has_type(value, str(known[name])):
                raise UsageError(f"model config field {name} must be {_KINDS[str(known[name])]}, got {value!r}")
        values: dict[str, Any] = {k: float(v) if known[k] == "float" else v for k, v in data.items()}
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> GPTConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"the model config is not valid JSON ({exc})") from None
        return cls.from_dict(data)


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false"}


def _has_type(value: Any, kind: str) -> bool:
    """JSON's value fits the field (`from __future__ import annotations` makes types strings)."""
    if isinstance(value, bool):  # an int to Python, not to a config
        return kind == "bool"
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return False


# GPT-2's released shapes (vocab 50257, context 1024, qkv bias, tied head) are converted by
# `gptcli convert`; these presets are the chapter's from-scratch variants: no qkv bias, untied head.
PRESETS: dict[str, GPTConfig] = {
    "124M": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "355M": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "774M": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "1558M": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # Small enough for tests and smoke runs on any laptop.
    "tiny": GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2),
}
PRESET_ALIASES: dict[str, str] = {
    "gpt2": "124M",
    "gpt2-small": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}


def preset_names() -> list[str]:
    return list(PRESETS) + list(PRESET_ALIASES)


def get_preset(name: str) -> GPTConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return PRESETS[key]


def model_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a model file of `config` holds (the tied head omitted)."""
    c = config.emb_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (config.vocab_size, c),
        "pos_emb.weight": (config.context_length, c),
    }
    for i in range(config.n_layers):
        p = f"blocks.{i}."
        shapes[p + "att.qkv.weight"] = (3 * c, c)
        if config.qkv_bias:
            shapes[p + "att.qkv.bias"] = (3 * c,)
        shapes[p + "att.out_proj.weight"] = (c, c)
        shapes[p + "att.out_proj.bias"] = (c,)
        shapes[p + "ff.fc.weight"] = (4 * c, c)
        shapes[p + "ff.fc.bias"] = (4 * c,)
        shapes[p + "ff.proj.weight"] = (c, 4 * c)
        shapes[p + "ff.proj.bias"] = (c,)
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (c,)
            shapes[p + norm + ".bias"] = (c,)
    shapes["final_norm.weight"] = (c,)
    shapes["final_norm.bias"] = (c,)
    if not config.tie_weights:
        shapes["out_head.weight"] = (config.vocab_size, c)
    return shapes


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """The chapter's two counts, from the shapes: with a separate output head (`untied`) and with it
    shared (`tied`); `total` is this model's own (distinct tensors). GPT-2 124M at context 1024:
    untied 163,009,536, tied 124,412,160."""
    def total(n_layers: int) -> int:
        shapes = model_shapes(config.replace(tie_weights=True, n_layers=n_layers))
        return sum(math.prod(shape) for shape in shapes.values())

    one = total(1)  # blocks are alike: counted from one and two, whatever the depth
    tied = one + (config.n_layers - 1) * (total(2) - one)
    untied = tied + config.vocab_size * config.emb_dim
    return {"total": tied if config.tie_weights else untied, "untied": untied, "tied": tied}
