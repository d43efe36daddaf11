"""The GPT of the chapter: learned positions, pre-LayerNorm blocks, causal multi-head attention,
tanh-GELU feed-forward, untied (optionally tied) output head. Attention runs through
`scaled_dot_product_attention`; an optional preallocated key/value cache serves decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.config import GPTConfig


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    Shape (n_layers, batch, n_heads, max_length, head_dim). `length` is how many positions are
    filled; the model appends to it on each cached forward pass.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_length = max_length or config.context_length
        shape = (config.n_layers, batch_size, config.n_heads, self.max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: follow each surviving beam's parent)."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        # One fused projection for queries, keys and values. With the chapter's default
        # (no qkv bias) its initial weights equal the chapter's three separate Linear layers.
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.dropout = config.drop_rate

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq_len, emb_dim = x.shape
        q, k, v = self.qkv(x).split(emb_dim, dim=2)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)

        mask = None
        is_causal = True
        if cache is not None:
            start = cache.length
            end = start + seq_len
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            k = cache.keys[layer, :, :, :end]
            v = cache.values[layer, :, :, :end]
            if seq_len == 1:
                is_causal = False  # one new query attends to every cached position
            elif start > 0:
                is_causal = False
                mask = torch.ones(seq_len, end, dtype=torch.bool, device=x.device).tril(diagonal=start)

        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(batch, seq_len, emb_dim)
        return self.out_proj(y)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # Construction order follows the chapter so that seeded initialisation matches it.
        self.att = CausalSelfAttention(config)
        self.ff = FeedForward(config)
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); with `last_only`, (batch, 1, vocab) for the last position."""
        seq_len = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq_len > self.config.context_length:
            raise ValueError(
                f"sequence of {start + seq_len} tokens exceeds the context length {self.config.context_length}"
            )
        pos = torch.arange(start, start + seq_len, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += seq_len
        if last_only:
            x = x[:, -1:, :]
        return self.out_head(self.final_norm(x))


def parameter_counts(config: GPTConfig) -> tuple[int, int]:
    """(all parameters with an untied head, parameters counting a tied head once).

    GPT-2 124M at context 1024: (163,009,536, 124,412,160).
    """
    c, v = config.emb_dim, config.vocab_size
    qkv = 3 * c * c + (3 * c if config.qkv_bias else 0)
    block = qkv + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * (2 * c)
    body = v * c + config.context_length * c + config.n_layers * block + 2 * c
    return body + v * c, body
