"""Packing documents into fixed-length rows with document boundaries.

Each row of `row_len` tokens (default `seq_len`) holds whole documents of at most `seq_len`
tokens back to back; the remainder is padding. Positions restart at 0 in every document,
`cu_seqlens` (over the flattened B*S stream) tells attention where documents start, and a
document never crosses a row. A target is the next token of the same document; the last
token of a document, padding, and every target that is a CM3 sentinel carry IGNORE (no loss);
so do targets inside the ranges `context_only(doc)` names (tokens the model reads but is not
taught to produce: engine.data.cm3.images_after_caption_spans).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from engine.tokenizer.vocab import Vocab

IGNORE = -100


@dataclass
class PackedBatch:
    ids: torch.Tensor          # [B, S] long
    targets: torch.Tensor      # [B, S] long, IGNORE where no loss
    positions: torch.Tensor    # [B, S] long, restarting per document
    cu_seqlens: torch.Tensor   # [n_docs + 1] int32 over the flattened B*S tokens

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.ids, self.targets, self.positions, self.cu_seqlens)))

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def rows(self, start: int, end: int) -> "PackedBatch":
        """Rows [start, end) as a batch of their own. No document crosses a row, so the
        boundaries inside those rows, shifted to the first one, are the part's cu_seqlens."""
        S = self.ids.shape[1]
        cu = self.cu_seqlens
        inside = (cu >= start * S) & (cu <= end * S)
        return PackedBatch(self.ids[start:end], self.targets[start:end],
                           self.positions[start:end], cu[inside] - start * S)


class Packer:
    """Pulls documents from an iterator and packs them into batches; never splits one."""

    def __init__(self, docs: Iterator[list[int]], vocab: Vocab, seq_len: int,
                 row_len: int | None = None,
                 context_only: Callable[[list[int]], list[tuple[int, int]]] | None = None):
        row_len = seq_len if row_len is None else row_len
        if row_len < seq_len:
            raise ValueError(f"row_len {row_len} is shorter than seq_len {seq_len}: a "
                             "document of seq_len tokens would never fit a row")
        self.docs, self.vocab, self.seq_len, self.row_len = docs, vocab, seq_len, row_len
        self.context_only = context_only
        self.pending: list[int] | None = None
        self.skipped = 0          # documents longer than seq_len (counted, never truncated)
        self.exhausted = False    # a finite iterator has run out (the rest is padding)

    def _next_doc(self) -> list[int] | None:
        """The next document that fits, or None once a finite iterator has run out."""
        if self.pending is not None:
            doc, self.pending = self.pending, None
            return doc
        for doc in self.docs:
            if len(doc) <= self.seq_len:
                return doc
            self.skipped += 1
        self.exhausted = True
        return None

    def all_batches(self, batch_size: int) -> list[PackedBatch]:
        """Every document of a finite iterator exactly once (a validation set), in batches;
        the last batch's leftover rows are padding."""
        batches = []
        while not self.exhausted:
            batch = self.next_batch(batch_size)
            if batch.num_targets:
                batches.append(batch)
        return batches

    def next_batch(self, batch_size: int) -> PackedBatch:
        S = self.row_len
        flat: list[int] = []          # the rows' tokens back to back, padding included
        bounds = [0]
        context: list[tuple[int, int]] = []     # [start, end) in flat: no loss as targets
        for row in range(batch_size):
            used = 0
            while True:
                doc = self._next_doc()
                if doc is None:
                    break
                if used + len(doc) > S:
                    self.pending = doc
                    break
                if self.context_only is not None:
                    context += [(len(flat) + a, len(flat) + b) for a, b in self.context_only(doc)]
                flat += doc
                used += len(doc)
                bounds.append(row * S + used)
            if used < S:  # the padding tail is its own "document": attends only to itself
                flat += [self.vocab.pad] * (S - used)
                bounds.append((row + 1) * S)
        # Targets and positions in whole-batch tensor ops: per-token Python here was most of
        # the time spent building a batch.
        ids = torch.tensor(flat, dtype=torch.long)
        cu = torch.tensor(bounds, dtype=torch.int32)
        index = torch.arange(batch_size * S)
        doc_of = torch.searchsorted(cu[1:], index, right=True)
        positions = index - cu[doc_of]
        targets = torch.roll(ids, -1)
        sentinel = (targets >= self.vocab.sentinel_start) & (targets < self.vocab.bpe_start)
        doc_end = torch.zeros_like(ids, dtype=torch.bool)
        doc_end[cu[1:].long() - 1] = True
        no_loss = sentinel | doc_end | (ids == self.vocab.pad)
        if context:
            read_only = torch.zeros_like(no_loss)
            for a, b in context:
                read_only[a:b] = True
            no_loss |= torch.roll(read_only, -1)     # the target of position j is token j + 1
        targets[no_loss] = IGNORE
        return PackedBatch(ids.view(batch_size, S), targets.view(batch_size, S),
                           positions.view(batch_size, S), cu)
