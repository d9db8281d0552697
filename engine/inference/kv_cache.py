"""The KV cache interface the model writes through, and a contiguous implementation.

The model only calls `update(layer, k, v)` (append this step's keys/values, get back the
whole history) and `advance(n)` after a forward, and reads `length`. A paged cache can
replace ContiguousKVCache behind the same three members.
"""
from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def advance(self, n: int) -> None:
        ...


class ContiguousKVCache:
    """One preallocated [B, H_kv, max_len, d] buffer per layer for keys and for values."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only the given batch rows (in that order): finished sequences stop costing
        attention work. Optional for other caches; a paged cache frees their blocks instead."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
