"""The block manager's rules in plain Python: the oracle csrc/cpu/block_manager is tested
against, and the manager PagedKVCache falls back to when engine._C is not built.

Same methods and results as torch.classes.engine.BlockManager (see block_manager.h for the
rules). Written for obviousness, not speed: the free queue is a list, and cached blocks are
keyed by the whole token prefix up to their end (no hash, so no collision to reason about).
"""
from __future__ import annotations


class BlockModel:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0:
            raise ValueError("BlockManager: num_blocks must be positive")
        if block_size not in (8, 16, 32):
            raise ValueError(f"BlockManager: block_size must be 8, 16 or 32, got {block_size}")
        self._num_blocks, self._block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free_queue = list(range(num_blocks))
        self.key_of: dict[int, tuple] = {}       # block -> the prefix it is cached under
        self.cached: dict[tuple, int] = {}       # prefix (tokens up to the block's end) -> block
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.registered: dict[int, int] = {}     # seq -> leading full blocks already offered to the cache

    # -- the API ---------------------------------------------------------------------------
    def add_sequence(self, seq: int, tokens: list[int]) -> int:
        if seq in self.tables:
            raise ValueError(f"add_sequence: sequence {seq} exists")
        if not tokens:
            raise ValueError("add_sequence: a sequence needs at least one token")
        if self.blocks_needed(tokens) > len(self.free_queue):
            return -1
        hits = self._lookup(tokens)
        for b in hits:
            if self.refs[b] == 0:
                self.free_queue.remove(b)
            self.refs[b] += 1
        table = list(hits)
        for _ in range(len(hits), self._ceil(len(tokens))):
            table.append(self._pop())
        self.tables[seq], self.tokens[seq] = table, list(tokens)
        self.computed[seq] = self.registered[seq] = len(hits)
        self.computed[seq] *= self._block_size
        return len(hits) * self._block_size

    def append_token(self, seq: int, token: int) -> tuple[int, int, int]:
        table, toks = self.tables[self._known(seq)], self.tokens[seq]
        offset = len(toks) % self._block_size
        src = dst = -1
        if offset == 0:
            if not self.free_queue:
                return -1, -1, -1
            table.append(self._pop())
        elif self.refs[table[-1]] > 1:
            if not self.free_queue:
                return -1, -1, -1
            src, dst = table[-1], self._pop()
            self.refs[src] -= 1
            table[-1] = dst
        toks.append(token)
        return table[-1] * self._block_size + offset, src, dst

    def fork(self, parent: int, child: int) -> None:
        if child in self.tables:
            raise ValueError(f"fork: sequence {child} exists")
        self._known(parent)
        self.tables[child] = list(self.tables[parent])
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]
        self.registered[child] = self.registered[parent]
        for b in self.tables[child]:
            self.refs[b] += 1

    def free(self, seq: int) -> None:
        for b in reversed(self.tables[self._known(seq)]):
            assert self.refs[b] > 0, "refcount underflow"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                assert b not in self.free_queue, "double free"
                self.free_queue.append(b)
        for d in (self.tables, self.tokens, self.computed, self.registered):
            del d[seq]

    def mark_computed(self, seq: int, n: int) -> None:
        toks = self.tokens[self._known(seq)]
        if not self.computed[seq] <= n <= len(toks):
            raise ValueError(f"mark_computed: {n} is outside [{self.computed[seq]}, {len(toks)}]")
        self.computed[seq] = n
        bs = self._block_size
        for i in range(self.registered[seq], n // bs):
            b, key = self.tables[seq][i], tuple(toks[:(i + 1) * bs])
            if b not in self.key_of and key not in self.cached:
                self.key_of[b], self.cached[key] = key, b
        self.registered[seq] = max(self.registered[seq], n // bs)

    # -- queries ---------------------------------------------------------------------------
    def blocks_needed(self, tokens: list[int]) -> int:
        hits = self._lookup(tokens)
        return self._ceil(len(tokens)) - len(hits) + sum(self.refs[b] == 0 for b in hits)

    def block_table(self, seq: int) -> list[int]:
        return list(self.tables[self._known(seq)])

    def num_tokens(self, seq: int) -> int:
        return len(self.tokens[self._known(seq)])

    def num_computed(self, seq: int) -> int:
        return self.computed[self._known(seq)]

    def has_sequence(self, seq: int) -> bool:
        return seq in self.tables

    def refcount(self, block: int) -> int:
        return self.refs[self._block(block)]

    def is_cached(self, block: int) -> bool:
        return self._block(block) in self.key_of

    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def num_blocks(self) -> int:
        return self._num_blocks

    def block_size(self) -> int:
        return self._block_size

    def sequences(self) -> list[int]:
        return sorted(self.tables)

    # -- internals -------------------------------------------------------------------------
    def _ceil(self, n: int) -> int:
        return -(-n // self._block_size)

    def _lookup(self, tokens: list[int]) -> list[int]:
        """Leading full blocks of `tokens` already cached; never the one holding the last token."""
        hits = []
        for i in range((len(tokens) - 1) // self._block_size if tokens else 0):
            b = self.cached.get(tuple(tokens[:(i + 1) * self._block_size]))
            if b is None:
                break
            hits.append(b)
        return hits

    def _pop(self) -> int:
        b = self.free_queue.pop(0)
        key = self.key_of.pop(b, None)
        if key is not None:
            del self.cached[key]
        self.refs[b] = 1
        return b

    def _known(self, seq: int) -> int:
        if seq not in self.tables:
            raise IndexError(f"BlockManager: no sequence {seq}")
        return seq

    def _block(self, b: int) -> int:
        if not 0 <= b < self._num_blocks:
            raise IndexError(f"BlockManager: no block {b}")
        return b
