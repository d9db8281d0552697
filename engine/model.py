"""The decoder-only transformer over the mixed text/image vocabulary (OPT-like blocks).

Pre-LayerNorm blocks without biases or dropout; LayerNorm affine parameters are optional
(the paper has none); positions restart at every packed document and enter either as learned
absolute embeddings (the paper) or as rotary embeddings on q and k; grouped-query attention when n_kv_heads < n_heads. Attention and the loss go through
engine.ops only, so their fast backends plug in without touching this file.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from engine import ops
from engine.config import ModelConfig
from engine.inference.kv_cache import KVCache


POSITION_KINDS = ("learned", "rope")


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, 1, S, head_dim / 2] (fp32) for the given positions [B or 1, S]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device,
                                       dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + d/2}) of x [B, H, S, d] by the position's angles ("rotate
    half" layout), in fp32 so that bf16 activations do not lose the phase."""
    half = x.shape[-1] // 2
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        hidden = int(cfg.mlp_ratio * d)
        self.ln1 = nn.LayerNorm(d, elementwise_affine=cfg.norm_affine, bias=False)
        self.qkv = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=cfg.norm_affine, bias=False)
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x, cu_seqlens=None, cache: KVCache | None = None, rope=None):
        b, s, _ = x.shape
        qkv = self.qkv(self.ln1(x))
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                             self.n_kv * self.head_dim], dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            # Keys are rotated before they enter a cache: a key's angle depends only on its
            # own position, so cached keys stay valid as the sequence grows.
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and hasattr(cache, "attend"):
            # A paged cache attends over its blocks itself (rows of different lengths).
            a = cache.attend(self.layer, q, k, v)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
            a = ops.attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        if cfg.position not in POSITION_KINDS:
            raise ValueError(f"unknown model.position {cfg.position!r}; choose one of: "
                             f"{', '.join(POSITION_KINDS)}")
        if cfg.position == "rope" and cfg.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension (got {cfg.head_dim})")
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, elementwise_affine=cfg.norm_affine, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Training only: keep each block's input, recompute the block in backward
        # (TrainConfig.activation_checkpointing sets it). No dropout or other randomness runs
        # in a block, so the recomputation is the same computation.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # Residual output projections scaled by depth (GPT-2/OPT) keep the stream's
            # variance flat as layers are added.
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "fc2.weight")) else 1
            nn.init.normal_(p, std=std * scale)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """ids [B, S] -> final hidden states [B, S, d] (before the LM head)."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds the context "
                             f"length {self.cfg.max_seq_len}")
        x = self.tok_emb(ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        recompute = (self.activation_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for block in self.blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cu_seqlens, None, rope,
                                                      use_reentrant=False)
            else:
                x = block(x, cu_seqlens=cu_seqlens, cache=cache, rope=rope)
        if cache is not None:
            cache.advance(ids.shape[1])
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over positions with a target (ignore_index elsewhere)."""
        d = hidden.shape[-1]
        return ops.span_cross_entropy(hidden.reshape(-1, d), self.lm_head.weight,
                                      targets.reshape(-1))

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
