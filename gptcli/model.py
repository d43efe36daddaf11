"""The GPT of chapters 4 and 5: learned positions, pre-LayerNorm blocks, causal multi-head attention,
tanh-GELU feed-forward, an untied (optionally tied) output head, and a preallocated key/value
cache for decoding.

The chapter's names and gptcli's (benchmarks/chapter.py is the chapter's code, and
`to_gptcli_state_dict` there maps its weights onto these):

| the chapter                                   | gptcli                                          |
|-----------------------------------------------|-------------------------------------------------|
| `GPT_CONFIG_124M` (dict)                      | `GPTConfig` (gptcli/config.py), same keys       |
| `GPTModel`                                    | `GPT`                                           |
| `tok_emb`, `pos_emb`, `drop_emb`              | same                                            |
| `trf_blocks` (nn.Sequential)                  | `blocks` (nn.ModuleList: each gets the cache)   |
| `TransformerBlock`                            | `TransformerBlock`                              |
| `att` = `MultiHeadAttention`                  | `att` = `CausalSelfAttention`                   |
| `att.W_query`, `att.W_key`, `att.W_value`     | `att.qkv`: one Linear, rows query, key, value   |
| `att.out_proj`                                | `att.out_proj`                                  |
| `att.mask` (triu buffer) + `masked_fill`      | `is_causal=True` in `scaled_dot_product_attention` |
| `att.dropout` (nn.Dropout on the weights)     | `att.dropout` (its rate, SDPA's `dropout_p`)    |
| `ff.layers[0]`, `GELU()`, `ff.layers[2]`      | `ff.fc`, `ff.gelu`, `ff.proj`                   |
| `norm1`, `norm2`, `final_norm` (`LayerNorm`   | `nn.LayerNorm` (`weight`, `bias`), eps 1e-5     |
|   with `scale`, `shift`)                      |                                                 |
| `drop_shortcut`, `out_head`                   | same                                            |
| `calc_loss_batch`: cross-entropy of logits    | `model(idx, targets=...)` (`GPT.loss`)          |

Seeded initialisation equals the chapter's tensor for tensor (the layers are built in its order).

The methods marked `@fast_path(...)` may be computed by gptcli/kernels (CPU training with less
memory, the output layer and loss a chunk at a time, faster decoding steps); each body below is the
plain computation, which GPTCLI_KERNELS=0 runs everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptcli.config import GPTConfig
from gptcli.kernels.dispatch import fast_path


class KVCache:
    """Keys and values of every layer, preallocated for `max_length` positions.

    Shape (n_layers, batch, n_heads, max_length, head_dim). `length` is how many positions are
    filled; the model appends to it on each cached forward pass.

    The model goes through three hooks: `positions` (where the new tokens sit), `append` (store
    them, once per layer) and `advance` (count them). gptcli.batched's RaggedKVCache overrides
    them for rows of different lengths.
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

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Positions of the next `seq_len` tokens: (seq_len,) here; (batch, seq_len) in caches whose
        rows have different lengths."""
        return torch.arange(self.length, self.length + seq_len, device=device)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store `layer`'s new keys and values after the cached ones; return all of them with the
        attention mask and causal flag that let the new queries see every earlier position."""
        start = self.length
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if start == 0:
            return keys, values, None, True
        if k.shape[2] == 1:  # one new query attends to every cached position
            return keys, values, None, False
        mask = torch.ones(k.shape[2], end, dtype=torch.bool, device=k.device).tril(diagonal=start)
        return keys, values, mask, False

    def advance(self, seq_len: int) -> None:
        """Count the `seq_len` positions every layer has just appended."""
        self.length += seq_len

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: follow each surviving beam's parent)."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)

    def reset(self) -> None:
        self.length = 0


class Linear(nn.Linear):
    """nn.Linear; decoding steps on CPU may take faster matrix-vector kernels."""

    @fast_path("linear")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Dropout(nn.Dropout):
    """nn.Dropout; CPU training may keep a 1-byte mask (the same mask) for the backward pass."""

    @fast_path("dropout")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training, self.inplace)


class CausalSelfAttention(nn.Module):
    """The chapter's MultiHeadAttention, with the query, key and value projections fused."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        # With the chapter's default (no qkv bias) the fused layer's initial weights equal the
        # chapter's three separate Linear layers.
        self.qkv = Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = Linear(config.emb_dim, config.emb_dim)
        self.dropout = config.drop_rate

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, seq_len, emb_dim = x.shape
        q, k, v = self.qkv(x).split(emb_dim, dim=2)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        mask, is_causal = None, True
        if cache is not None:
            k, v, mask, is_causal = cache.append(layer, k, v)
        y = self.attend(q, k, v, mask, is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq_len, emb_dim))

    @fast_path("attention")
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim), causally masked), dropped out in training, times v."""
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.emb_dim, 4 * config.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = Linear(4 * config.emb_dim, config.emb_dim)

    @fast_path("feed_forward")
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
        self.drop_shortcut = Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.out_head = Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); with `last_only`, (batch, 1, vocab) for the last position.

        With `targets` (batch, seq), the mean cross-entropy of the logits against them instead (a
        float32 scalar; targets equal to -100 are not scored)."""
        seq_len = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq_len > self.config.context_length:
            raise ValueError(
                f"sequence of {start + seq_len} tokens exceeds the context length {self.config.context_length}"
            )
        pos = cache.positions(seq_len, idx.device) if cache is not None else torch.arange(seq_len, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(seq_len)
        if last_only:
            x = x[:, -1:, :]
        x = self.final_norm(x)
        if targets is not None:
            return self.loss(x, targets)
        return self.out_head(x)

    @fast_path("lm_head_loss")
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The chapter's `calc_loss_batch`: cross-entropy of the output layer's logits."""
        logits = self.out_head(hidden)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
