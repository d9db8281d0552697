"""The physical batch: every row (a sample's conditional, unconditional or image-only branch)
with its KV cache, run through the model one step at a time.

Why rows are grouped by length: engine.ops.attention has no per-row key lengths (no left
padding, no key-padding mask; a decode query attends to every cached key of its row), so a
rectangular forward needs rows of equal length. Rows of equal prompt length form one group
with one KV cache and one forward; since every row gains exactly one token per step, groups
never change except by dropping finished rows. Text->image with CFG on prompts of equal
length is therefore two forwards per step (conditional group, "<bos> <mask> <break>" group)
whatever the batch size; the logits of all groups land in one [rows, V] tensor so sampling
sees the paired rows together. With per-row key lengths in ops.attention (flash-attention's
seqused_k) the groups would merge into one forward without any change to the decoder.

`use_cache=False` recomputes each group's full sequence every step: the oracle the cached
path is tested against. `use_cache=True` (or "paged") keeps all rows in one paged KV cache
instead (engine/inference/paged_rows.py): ops.paged_decode_attention has per-row key lengths,
so every step is one forward of all rows and repeated prompts share their blocks;
"contiguous" keeps the per-group contiguous caches described above.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from engine.inference.kv_cache import ContiguousKVCache
from engine.inference.paged_rows import PagedRows
from engine.model import Transformer


class _Group:
    def __init__(self, rows: list[int], cache: ContiguousKVCache | None):
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.cache = cache


class RowBatch:
    """rows: each row's prompt ids. `capacity`: tokens each row may gain."""

    def __init__(self, model: Transformer, rows: list[list[int]], capacity: int,
                 use_cache: bool | str = True):
        if use_cache not in (True, False, "paged", "contiguous"):
            raise ValueError(f"use_cache must be True, False, 'paged' or 'contiguous', got {use_cache!r}")
        self.model, self.use_cache = model, bool(use_cache)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.ids = [list(r) for r in rows]
        self.logits = torch.zeros(len(rows), model.vocab_size, device=self.device)
        self.paged = PagedRows(model, rows, capacity) if use_cache in (True, "paged") else None
        if self.paged is not None:
            self.groups = []
            return
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_len[len(r)].append(i)
        self.groups = [_Group(idx, self._new_cache(len(idx), n + capacity) if use_cache else None)
                       for n, idx in sorted(by_len.items())]

    def _new_cache(self, batch: int, length: int) -> ContiguousKVCache:
        c = self.model.cfg
        return ContiguousKVCache(c.n_layers, batch, c.kv_heads, c.head_dim, length,
                                 self.dtype, self.device)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Runs every prompt; returns the fp32 logits of each row's last position [rows, V]."""
        if self.paged is not None:
            self.paged.prefill(self.logits)
            return self.logits
        for g in self.groups:
            ids = torch.tensor([self.ids[r] for r in g.rows.tolist()], device=self.device)
            self._forward(g, ids)
        return self.logits

    @torch.no_grad()
    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Appends tokens[row] to every live row and returns the new last-position logits."""
        for r, t in tokens.items():
            self.ids[r].append(t)
        if self.paged is not None:
            self.paged.step(tokens, self.logits)
            return self.logits
        for g in self.groups:
            rows = g.rows.tolist()
            if not rows:
                continue
            if self.use_cache:
                ids = torch.tensor([[tokens[r]] for r in rows], device=self.device)
            else:
                ids = torch.tensor([self.ids[r] for r in rows], device=self.device)
            self._forward(g, ids)
        return self.logits

    def _forward(self, g: _Group, ids: torch.Tensor) -> None:
        hidden = self.model(ids, cache=g.cache)[:, -1]
        self.logits[g.rows.to(self.device)] = self.model.logits(hidden)

    def drop(self, finished: set[int]) -> None:
        """Stops computing finished rows (their caches are compacted away)."""
        if not finished:
            return
        if self.paged is not None:
            self.paged.drop(finished)
            return
        for g in self.groups:
            rows = g.rows.tolist()
            keep = [i for i, r in enumerate(rows) if r not in finished]
            if len(keep) == len(rows):
                continue
            g.rows = g.rows[keep]
            if g.cache is not None and keep:
                g.cache.select_rows(torch.tensor(keep, device=self.device))
        self.groups = [g for g in self.groups if len(g.rows)]
