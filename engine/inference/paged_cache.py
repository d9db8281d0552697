"""A paged KV cache: per-layer block pools shared by many sequences, and per-forward views
that the model writes through.

KVPool owns the memory ([num_blocks, block_size, H_kv, d] keys and values per layer) and the
block manager (torch.classes.engine.BlockManager, or its Python model when engine._C is not
built). Callers register tokens with the pool before a forward (add / append / fork) and
drop finished sequences (free); the pool performs the copy-on-write copies the manager asks
for, in every layer.

PagedKVCache is the view one forward uses: the rows' sequence ids, where their new tokens go
(slot mapping) and how long each is after the forward. It implements the KVCache protocol
(update / advance / length), so the unchanged attention path works on it, and adds
`attend(layer, q, k, v)`: the model calls it instead of update + attention when it exists,
so decode steps read the blocks in place with ops.paged_decode_attention, rows of different
lengths in one batch.
"""
from __future__ import annotations

import torch

from engine import _native, ops
from engine.inference.block_model import BlockModel


def new_block_manager(num_blocks: int, block_size: int):
    if _native.AVAILABLE:
        return torch.classes.engine.BlockManager(num_blocks, block_size)
    return BlockModel(num_blocks, block_size)


class OutOfBlocks(RuntimeError):
    """The pool has no free block for this request now; free or preempt a sequence and retry."""


class KVPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.manager = new_block_manager(num_blocks, block_size)
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device = torch.device(device)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16) -> "KVPool":
        c = model.cfg
        p = next(model.parameters())
        return cls(c.n_layers, c.kv_heads, c.head_dim, num_blocks, block_size, p.dtype, p.device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_in_use(self) -> int:
        used = self.num_blocks - self.manager.num_free_blocks()
        return self.bytes * used // self.num_blocks

    def add(self, seq: int, tokens: list[int]) -> int:
        """Registers a sequence; returns how many leading tokens are already cached."""
        cached = self.manager.add_sequence(seq, list(tokens))
        if cached < 0:
            raise OutOfBlocks(f"no room for sequence {seq} ({len(tokens)} tokens, "
                              f"{self.manager.num_free_blocks()} free blocks)")
        return cached

    def can_add(self, tokens: list[int]) -> bool:
        return self.manager.blocks_needed(list(tokens)) <= self.manager.num_free_blocks()

    def append(self, seq: int, token: int) -> None:
        """Reserves the slot of one more token, copying a shared last block first."""
        slot, src, dst = self.manager.append_token(seq, token)
        if slot < 0:
            raise OutOfBlocks(f"no free block to extend sequence {seq}")
        if src >= 0:
            rows = slot % self.block_size
            for k, v in zip(self.k, self.v):
                k[dst, :rows] = k[src, :rows]
                v[dst, :rows] = v[src, :rows]

    def fork(self, parent: int, child: int) -> None:
        self.manager.fork(parent, child)

    def free(self, seq: int) -> None:
        self.manager.free(seq)

    def view(self, seqs: list[int]) -> "PagedKVCache":
        return PagedKVCache(self, seqs)


class PagedKVCache:
    """The rows of one forward: sequence seqs[i] is row i; each row's uncomputed tokens
    (registered with the pool, not yet written) are this forward's input, so all rows must
    have the same number of them."""

    def __init__(self, pool: KVPool, seqs: list[int]):
        m = pool.manager
        self.pool, self.seqs = pool, list(seqs)
        self.starts = [m.num_computed(s) for s in seqs]
        totals = [m.num_tokens(s) for s in seqs]
        news = {t - s for s, t in zip(self.starts, totals)}
        if len(news) != 1 or 0 in news:
            raise ValueError(f"every row of a forward needs the same number (> 0) of new tokens, got {sorted(news)}")
        self.new = news.pop()
        dev = pool.device
        bs = pool.block_size
        tables = [m.block_table(s) for s in seqs]
        width = max(len(t) for t in tables)
        self.block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor(totals, dtype=torch.int32, device=dev)
        slots = [t[p // bs] * bs + p % bs for t, s0 in zip(tables, self.starts) for p in range(s0, s0 + self.new)]
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)

    @property
    def length(self) -> int:
        """Tokens cached before this forward (the model's default position offset)."""
        if len(set(self.starts)) != 1:
            raise ValueError("rows start at different positions: pass positions= to the model")
        return self.starts[0]

    def positions(self) -> torch.Tensor:
        """[B, new] absolute positions of this forward's tokens."""
        start = torch.tensor(self.starts, device=self.pool.device)[:, None]
        return start + torch.arange(self.new, device=self.pool.device)[None]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, hkv, s, d = k.shape
        ops.write_kv(k.transpose(1, 2).reshape(b * s, hkv, d), v.transpose(1, 2).reshape(b * s, hkv, d),
                     self.pool.k[layer], self.pool.v[layer], self.slot_mapping)

    def _gather(self, layer: int, rows: slice | list[int], length: int):
        """Contiguous [b, H_kv, length, d] keys and values of the given rows."""
        tables = self.block_tables[rows].long().clamp_min(0)
        return [pool[tables].flatten(1, 2)[:, :length].transpose(1, 2)
                for pool in (self.pool.k[layer], self.pool.v[layer])]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """The KVCache protocol: write, then return the whole history (rows of equal length)."""
        self._write(layer, k, v)
        lengths = set(self.seq_lens.tolist())
        if len(lengths) != 1:
            raise ValueError("update() needs rows of equal length; the model uses attend() for mixed lengths")
        return self._gather(layer, slice(None), lengths.pop())

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Writes this step's k/v and returns causal attention [B, H, new, d] over each row's history."""
        self._write(layer, k, v)
        if self.new == 1:
            out = ops.paged_decode_attention(q[:, :, 0], self.pool.k[layer], self.pool.v[layer],
                                             self.block_tables, self.seq_lens)
            return out[:, :, None]
        # Prefill (or a chunk of new tokens): rows of equal length share one attention call.
        out = torch.empty_like(q)
        lens = self.seq_lens.tolist()
        for length in sorted(set(lens)):
            rows = [i for i, n in enumerate(lens) if n == length]
            kk, vv = self._gather(layer, rows, length)
            out[rows] = ops.attention(q[rows], kk, vv, causal=True)
        return out

    def advance(self, n: int) -> None:
        if n != self.new:
            raise ValueError(f"advance({n}) after a forward of {self.new} new tokens")
        for seq, start in zip(self.seqs, self.starts):
            self.pool.manager.mark_computed(seq, start + n)
        self.starts = [s + n for s in self.starts]
