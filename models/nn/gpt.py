"""The VQ-GAN transformer prior: a decoder-only (GPT) model over a flattened code grid.

The sequence is ``[start, c_0, c_1, ..., c_{N-2}]`` -> logits for ``c_0 .. c_{N-1}``;
the start token is a learned embedding per class (one shared embedding when
unconditional). Sampling is batched, uses a KV cache, and draws each token by
inverse-CDF from a given uniform (so one latent per image fixes its sample,
whatever the batch), with temperature, top-k and top-p filtering. Grids larger
than the training context are sampled with taming-transformers' sliding window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # with a cache, new queries see every cached key (they come after them); without, causal
        causal = cache is None or k.shape[2] == t
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int, n_classes: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.vocab, self.block_size = vocab, block_size
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.start = nn.Embedding(n_classes, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, caches: list[dict] | None = None,
                pos: int = 0) -> torch.Tensor:
        """Logits [B, T(+1), vocab]. Without ``caches``: ``idx`` [B, T] are tokens 0..T-1 and the start token
        is prepended (T+1 outputs). With ``caches``: only the new positions ``pos..``; ``idx`` None means the
        start token alone (pos 0)."""
        parts = []
        if pos == 0:
            parts.append(self.start(cond)[:, None])
        if idx is not None and idx.shape[1]:
            parts.append(self.tok_emb(idx))
        x = torch.cat(parts, 1)
        t = x.shape[1]
        if pos + t > self.block_size:
            raise ValueError(f"sequence of {pos + t} exceeds the prior's context of {self.block_size} tokens")
        x = self.drop(x + self.pos_emb[:, pos : pos + t])
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Linear weights only (not biases, LayerNorm, embeddings, positions): minGPT's rule."""
    decay, no_decay = [], []
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            (decay if isinstance(mod, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from ``base`` to ``floor * base`` at ``total`` steps."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Probabilities [B, V] after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sp, order = probs.sort(-1, descending=True)
        # drop a token when the tokens strictly more probable already reach top_p (the top one always stays)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one token per row from probabilities [B, V] and uniforms [B] in (0, 1)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1).contiguous()).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(gpt: GPT, cond: torch.Tensor, grid: tuple[int, int], u: torch.Tensor, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
           train_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Code grids [B, H, W] drawn from the prior; ``u`` [B, H*W] holds one uniform per token.

    ``train_grid``: the (h, w) grid the prior was trained on; when (H, W) is larger, each token is drawn
    with the model looking at the h x w window that contains it (sliding window; no cache).
    """
    h, w = grid
    b = cond.shape[0]
    if u.shape != (b, h * w):
        raise ValueError(f"need one uniform per token: u has shape {tuple(u.shape)}, expected {(b, h * w)}")
    th, tw = train_grid or grid
    if (h, w) != (th, tw):
        if h < th or w < tw:
            raise ValueError(f"grid {grid} is smaller than the training grid {(th, tw)}")
        return _sample_sliding(gpt, cond, (h, w), (th, tw), u, temperature, top_k, top_p)
    if h * w > gpt.block_size:
        raise ValueError(f"grid {grid} needs {h * w} tokens; the prior's context is {gpt.block_size}: pass train_grid")
    out = torch.empty(b, h * w, dtype=torch.long, device=cond.device)
    caches: list[dict] | None = [{} for _ in gpt.blocks] if use_cache else None
    for i in range(h * w):
        if use_cache:
            logits = gpt(None if i == 0 else out[:, i - 1 : i], cond, caches, pos=i)[:, -1]
        else:
            logits = gpt(out[:, :i], cond)[:, -1]
        out[:, i] = draw(filter_logits(logits, temperature, top_k, top_p), u[:, i])
    return out.view(b, h, w)


def _sample_sliding(gpt, cond, grid, train_grid, u, temperature, top_k, top_p) -> torch.Tensor:
    (H, W), (h, w) = grid, train_grid
    b = cond.shape[0]
    out = torch.zeros(b, H, W, dtype=torch.long, device=cond.device)
    for i in range(H):
        i0 = min(max(i - h // 2, 0), H - h)
        for j in range(W):
            j0 = min(max(j - w // 2, 0), W - w)
            window = out[:, i0 : i0 + h, j0 : j0 + w].reshape(b, -1)
            local = (i - i0) * w + (j - j0)
            logits = gpt(window[:, :local], cond)[:, -1]
            out[:, i, j] = draw(filter_logits(logits, temperature, top_k, top_p), u[:, i * W + j])
    return out
