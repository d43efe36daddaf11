"""What several cases share: the-verdict's tokens, and GPT-2 124M with random weights in gptcli's
and transformers' models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from benchmarks.plan import gpt2_config
from gptcli.assets import VERDICT

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from gptcli.config import GPTConfig
    from gptcli.model import GPT


def verdict_tokens() -> list[int]:
    from gptcli.tokenizer import encode, get_tokenizer

    return encode(get_tokenizer(), VERDICT.read_text(encoding="utf-8"))


def verdict_lines(count: int) -> list[list[int]]:
    """The token ids of the-verdict's first `count` non-empty lines (repeated if it has fewer)."""
    from gptcli.tokenizer import encode, get_tokenizer

    tokenizer = get_tokenizer()
    lines = [line for line in VERDICT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [encode(tokenizer, lines[i % len(lines)]) for i in range(count)]


def random_gpt2(tiny: bool) -> GPT:
    """gptcli's GPT-2 124M (or --tiny's GPT-2-shaped model), seeded, with GPT-2-like weight scales."""
    from gptcli.model import GPT

    torch.manual_seed(123)
    model = GPT(gpt2_config(tiny)).eval()
    with torch.no_grad():  # GPT-2-like scales, so the logits are not degenerate
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _hf_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptcli's state dict under transformers' GPT-2 names (Conv1D weights transposed)."""
    mapped = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
              "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
    for i in range(config.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        pairs = {"ln_1": "norm1", "ln_2": "norm2"}
        for h, g in pairs.items():
            mapped[dst + h + ".weight"] = state[src + g + ".weight"]
            mapped[dst + h + ".bias"] = state[src + g + ".bias"]
        linear = {"attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj"}
        for h, g in linear.items():
            mapped[dst + h + ".weight"] = state[src + g + ".weight"].t().contiguous()  # Conv1D is (in, out)
            mapped[dst + h + ".bias"] = state[src + g + ".bias"]
    return mapped


def hf_gpt2(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
    """transformers' GPT2LMHeadModel holding gptcli's (GPT-2-shaped) weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
    )).eval()
    hf.generation_config.eos_token_id = None  # never stop early, like the other implementations
    missing, unexpected = hf.load_state_dict(_hf_state(config, state), strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith(".attn.bias")]
    if missing or unexpected:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    return hf
