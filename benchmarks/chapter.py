"""A faithful re-implementation of the chapter's code (its GPTModel with hand-written LayerNorm,
GELU and masked attention; its loader semantics; its uncached `generate_text`), used as the
baseline in benchmarks and as the reference in equivalence tests. Not part of the gptcli package."""

from __future__ import annotations

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(), nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x))) + shortcut
        shortcut = x
        return self.drop_shortcut(self.ff(self.norm2(x))) + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        _, seq_len = in_idx.shape
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def generate_text(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The chapter's uncached generation loop, verbatim in logic."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def config_dict(config) -> dict:
    """A gptcli GPTConfig as the chapter's GPT_CONFIG dict."""
    return {k: getattr(config, k) for k in
            ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")}


QKV = ("query", "key", "value")


def _name_pairs(n_layers: int) -> list[tuple[str, str]]:
    """(chapter name, gptcli name) of every parameter except the query/key/value projections, which
    gptcli fuses into one."""
    pairs = [("tok_emb.weight", "tok_emb.weight"), ("pos_emb.weight", "pos_emb.weight"),
             ("final_norm.scale", "final_norm.weight"), ("final_norm.shift", "final_norm.bias"),
             ("out_head.weight", "out_head.weight")]
    for i in range(n_layers):
        c, g = f"trf_blocks.{i}.", f"blocks.{i}."
        pairs += [(c + "att.out_proj.weight", g + "att.out_proj.weight"),
                  (c + "att.out_proj.bias", g + "att.out_proj.bias"),
                  (c + "ff.layers.0.weight", g + "ff.fc.weight"), (c + "ff.layers.0.bias", g + "ff.fc.bias"),
                  (c + "ff.layers.2.weight", g + "ff.proj.weight"), (c + "ff.layers.2.bias", g + "ff.proj.bias")]
        for norm in ("norm1", "norm2"):
            pairs += [(c + f"{norm}.scale", g + f"{norm}.weight"), (c + f"{norm}.shift", g + f"{norm}.bias")]
    return pairs


def to_gptcli_state_dict(chapter_state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The chapter's parameters under gptcli's names (W_query/W_key/W_value fused into qkv)."""
    out = {g: chapter_state[c] for c, g in _name_pairs(n_layers)}
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            names = [f"trf_blocks.{i}.att.W_{n}.{kind}" for n in QKV]
            if names[0] in chapter_state:
                out[f"blocks.{i}.att.qkv.{kind}"] = torch.cat([chapter_state[n] for n in names])
    return out


def from_gptcli_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """gptcli's parameters under the chapter's names (qkv split; a tied head becomes a copy)."""
    out = {c: state[g] for c, g in _name_pairs(n_layers) if g != "out_head.weight"}
    out["out_head.weight"] = state.get("out_head.weight", state["tok_emb.weight"]).clone()
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            fused = state.get(f"blocks.{i}.att.qkv.{kind}")
            if fused is not None:
                for part, name in zip(fused.chunk(3), QKV, strict=True):
                    out[f"trf_blocks.{i}.att.W_{name}.{kind}"] = part
    return out


class GPTDatasetV1(torch.utils.data.Dataset):
    def __init__(self, txt, tokenizer, max_length, stride):
        self.input_ids, self.target_ids = [], []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i : i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1 : i + max_length + 1]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt, tokenizer, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True):
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       max_steps=None):
    """The chapter's loop (without the per-epoch sample, which draws no random numbers).
    Returns [(step, train_loss, val_loss), ...]."""
    history = []
    global_step = -1
    for _ in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
                    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
                model.train()
                history.append((global_step, train_loss, val_loss))
            if max_steps is not None and global_step + 1 >= max_steps:
                return history
    return history


def run_chapter_training(text, tokenizer, cfg, batch_size=2, num_epochs=10, eval_freq=5, eval_iter=5,
                         lr=4e-4, weight_decay=0.1, seed=123, train_ratio=0.9, max_steps=None):
    """The chapter's whole pretraining run: split, loaders, seeded model, AdamW, loop."""
    split_idx = int(train_ratio * len(text))
    torch.manual_seed(seed)
    train_loader = create_dataloader_v1(text[:split_idx], tokenizer, batch_size, cfg["context_length"],
                                        cfg["context_length"], shuffle=True, drop_last=True)
    val_loader = create_dataloader_v1(text[split_idx:], tokenizer, batch_size, cfg["context_length"],
                                      cfg["context_length"], shuffle=False, drop_last=False)
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs, eval_freq, eval_iter,
                              max_steps=max_steps), model
