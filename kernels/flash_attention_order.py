"""The order in which flash-attention programs are launched: heaviest first, a few heads at a time.

Every kernel here runs one program per (block of rows, batch * head) and the GPU starts
programs in launch order as earlier ones finish. Two things depend on that order:
  - balance: with causal masking, a query block near the end of the sequence does up to
    S / BLOCK_N times the work of the first one. Launched head by head, the last head's
    heaviest blocks start shortly before the end and run alone while other SMs idle. At
    seq 4k, 64 heads, 64-row tiles and two programs per SM, a model of the scheduler
    (scripts/launch_order_model.py: greedy, in launch order, a lone program at ~65% of the
    SM's rate) loses 5-6% of the forward to that tail and 6% of each backward kernel; at
    16k, 0.6%.
  - L2 reuse: programs of one head read the same K and V, so the programs resident at once
    should come from a few heads whose K/V fit in L2.
So programs go out in groups of HEAD_GROUP heads: within a group, block by block from the
heaviest, each block for every head of the group; groups one after another. HEAD_GROUP is as
many heads as fit an L2 budget, so a whole group's K/V stays cached while its programs run
(the same model puts 4k's loss at 0.1-0.2% with the 8 heads the budget gives there).
HEAD_GROUP = 1 is the head-by-head order.
This is FlashAttention-3's longest-processing-time-first scheduling with an L2 swizzle,
written for a one-dimensional Triton grid.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def budget_from_env(value: str | None) -> int:
    """ENGINE_FLASH_L2_BUDGET_MIB (MiB, >= 0) in bytes; 16 MiB when unset. H100 and H200
    have 50 MiB of L2 in two partitions: a third of it leaves room for Q, O and the traffic
    of programs outside the group. 0 gives head-by-head order. scripts/attention_launch_order.py
    measures budgets on a GPU; bench/gpu.sh runs the rest of its benchmarks with the best."""
    if value is None or value == "":
        return 16 * 2**20
    try:
        mib = float(value)
    except ValueError:
        mib = -1.0
    if not mib >= 0:
        raise ValueError(f"ENGINE_FLASH_L2_BUDGET_MIB={value!r}: expected a number of MiB >= 0")
    return int(mib * 2**20)


# K/V bytes that a group's resident programs may share in L2. Tests shrink it (or patch
# head_group) to get groups of a few heads.
L2_BUDGET_BYTES = budget_from_env(os.environ.get("ENGINE_FLASH_L2_BUDGET_MIB"))


def head_group(batch_heads: int, kv_bytes_per_head: int, causal: bool) -> int:
    """Heads per launch group. Without the causal mask every block costs the same and the
    head-by-head order is already balanced and L2-friendly."""
    if not causal:
        return 1
    return max(1, min(batch_heads, L2_BUDGET_BYTES // max(kv_bytes_per_head, 1)))


def launch_grid(n_blocks: int, batch_heads: int) -> tuple[int]:
    return (n_blocks * batch_heads,)


@triton.jit
def program_tile(N_BLOCKS, HEAD_GROUP, HEAVIEST_LAST: tl.constexpr):
    """(block index, batch * head index) of this program of a launch_grid(N_BLOCKS, ...)
    grid, in the grouped, heaviest-first order above. HEAVIEST_LAST: the block with the
    highest index does the most work (the forward and dQ under causal masking); otherwise
    block 0 does (dK/dV under causal masking)."""
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // N_BLOCKS
    per_group = HEAD_GROUP * N_BLOCKS
    group = pid // per_group
    rank = pid - group * per_group
    size = tl.minimum(HEAD_GROUP, n_bh - group * HEAD_GROUP)   # the last group may be smaller
    block = rank // size
    bh = group * HEAD_GROUP + (rank - block * size)
    if HEAVIEST_LAST:
        block = N_BLOCKS - 1 - block
    return block, bh
