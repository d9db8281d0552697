"""RowBatch's rows over one paged KV cache (the generation engine's default cache).

With per-row key lengths (ops.paged_decode_attention) the rows need no grouping by length:
every decode step is one forward of all live rows, one token each. Rows with identical
prompts (a prompt's n samples, every sample's unconditional "<bos> <mask> <break>" row)
are prefilled once and forked, so they share the prompt's blocks until they diverge
(copy-on-write of the last, partly filled block). Finished rows free their blocks at once.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from engine.inference.paged_cache import KVPool
from engine.model import Transformer


class PagedRows:
    def __init__(self, model: Transformer, rows: list[list[int]], capacity: int, block_size: int = 16):
        self.model = model
        self.prompts = [list(r) for r in rows]
        # Enough for every row to own all its blocks: forks only ever need fewer.
        blocks = sum(-(-(len(r) + capacity) // block_size) for r in rows)
        self.pool = KVPool.for_model(model, blocks, block_size)
        self.live = list(range(len(rows)))

    @torch.no_grad()
    def prefill(self, logits: torch.Tensor) -> None:
        """Runs each distinct prompt once (equal lengths together), forks the repeats."""
        leader: dict[tuple, int] = {}
        repeats: list[tuple[int, int]] = []
        by_len: dict[int, list[int]] = defaultdict(list)
        for r, p in enumerate(self.prompts):
            key = tuple(p)
            if key in leader:
                repeats.append((leader[key], r))
            else:
                leader[key] = r
                by_len[len(p)].append(r)
        dev = self.pool.device
        for rows in by_len.values():
            # A prompt may begin with full blocks an earlier group computed (prefix cache):
            # rows that start at the same cached length run together, from there on.
            by_start: dict[int, list[int]] = defaultdict(list)
            for r in rows:
                by_start[self.pool.add(r, self.prompts[r])].append(r)
            for start, same in by_start.items():
                view = self.pool.view(same)
                ids = torch.tensor([self.prompts[r][start:] for r in same], device=dev)
                hidden = self.model(ids, cache=view)[:, -1]
                logits[torch.tensor(same, device=dev)] = self.model.logits(hidden)
        for src, r in repeats:
            self.pool.fork(src, r)
            logits[r] = logits[src]

    @torch.no_grad()
    def step(self, tokens: dict[int, int], logits: torch.Tensor) -> None:
        """Appends tokens[row] to every live row: one forward over all of them."""
        rows = [r for r in self.live if r in tokens]
        if not rows:
            return
        for r in rows:
            self.pool.append(r, tokens[r])
        view = self.pool.view(rows)
        dev = self.pool.device
        ids = torch.tensor([[tokens[r]] for r in rows], device=dev)
        hidden = self.model(ids, positions=view.positions(), cache=view)[:, -1]
        logits[torch.tensor(rows, device=dev)] = self.model.logits(hidden)

    def drop(self, finished: set[int]) -> None:
        for r in finished:
            if r in self.live:
                self.pool.free(r)
        self.live = [r for r in self.live if r not in finished]
