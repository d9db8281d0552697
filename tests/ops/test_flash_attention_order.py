"""The flash-attention launch order (kernels/flash_attention_order.py): every (block, head)
tile exactly once, heaviest first within groups of heads, and the kernels right under it.

The tiny test tensors fit any L2 budget, so the other tests run every head in one group; the
tests here also force small groups, with a smaller last one."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels import flash_attention as fa  # noqa: E402
from kernels import flash_attention_order as order  # noqa: E402
from kernels.flash_attention_order import program_tile  # noqa: E402
from tests.ops.test_flash_attention import ROWS_83, check, documents  # noqa: E402


@triton.jit
def _record_tiles(OUT, N_BLOCKS, HEAD_GROUP, HEAVIEST_LAST: tl.constexpr):
    block, bh = program_tile(N_BLOCKS, HEAD_GROUP, HEAVIEST_LAST)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, block)
    tl.store(OUT + 2 * pid + 1, bh)


def launch_order(n_blocks: int, n_bh: int, group: int, heaviest_last: bool) -> list[tuple]:
    out = torch.full((n_blocks * n_bh, 2), -1, dtype=torch.int32)
    _record_tiles[order.launch_grid(n_blocks, n_bh)](out, n_blocks, group, heaviest_last)
    return [tuple(row) for row in out.tolist()]


def expected_order(n_blocks, n_bh, group, heaviest_last):
    blocks = range(n_blocks - 1, -1, -1) if heaviest_last else range(n_blocks)
    return [(blk, bh) for start in range(0, n_bh, group) for blk in blocks
            for bh in range(start, min(start + group, n_bh))]


@pytest.mark.parametrize("n_blocks,n_bh,group", [(5, 7, 3), (4, 8, 4), (3, 5, 1), (6, 2, 8),
                                                 (1, 9, 2)])
@pytest.mark.parametrize("heaviest_last", [True, False])
def test_every_tile_once_heaviest_first_by_head_group(n_blocks, n_bh, group, heaviest_last):
    got = launch_order(n_blocks, n_bh, group, heaviest_last)
    assert sorted(got) == [(b, h) for b in range(n_blocks) for h in range(n_bh)]
    assert got == expected_order(n_blocks, n_bh, group, heaviest_last)


def test_group_of_one_is_head_by_head_order():
    got = launch_order(4, 3, 1, True)
    assert got == [(blk, bh) for bh in range(3) for blk in (3, 2, 1, 0)]


def test_head_group_fills_the_l2_budget(monkeypatch):
    monkeypatch.setattr(order, "L2_BUDGET_BYTES", 10 * 2**20)
    assert order.head_group(64, 2 * 2**20, causal=True) == 5
    assert order.head_group(3, 2 * 2**20, causal=True) == 3       # never more than there are
    assert order.head_group(64, 64 * 2**20, causal=True) == 1     # one head over budget: 1
    assert order.head_group(64, 2 * 2**20, causal=False) == 1     # balanced without a mask
    monkeypatch.setattr(order, "L2_BUDGET_BYTES", 0)
    assert order.head_group(64, 2 * 2**20, causal=True) == 1


def test_budget_from_env():
    assert order.budget_from_env(None) == order.budget_from_env("") == 16 * 2**20
    assert order.budget_from_env("0") == 0
    assert order.budget_from_env("2.5") == int(2.5 * 2**20)
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(ValueError, match="ENGINE_FLASH_L2_BUDGET_MIB"):
            order.budget_from_env(bad)


@pytest.fixture
def groups_of_three(monkeypatch):
    """Causal launches in groups of 3 heads whatever the tensors' size (1 without the mask,
    as the launcher's rule has it), so 8 query heads run as 3 + 3 + 2 and the dK/dV pass's
    4 kv heads as 3 + 1."""
    monkeypatch.setattr(fa, "head_group", lambda bh, nbytes, causal: min(3, bh) if causal else 1)


@pytest.mark.parametrize("variant", fa.VARIANTS)
@pytest.mark.parametrize("seq", [7, 83])
def test_kernels_in_small_head_groups(groups_of_three, monkeypatch, variant, seq):
    monkeypatch.setattr(fa, "_INTERPRETER", fa._INTERPRETER._replace(variant=variant))
    check(2, 4, 2, seq, seq, 64, True, torch.float32)


def test_packed_documents_in_small_head_groups(groups_of_three):
    cu, seq = documents(ROWS_83)
    check(2, 4, 2, seq, seq, 64, True, torch.float16, cu_seqlens=cu, layout="bshd")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", fa.VARIANTS)
def test_cuda_bf16_in_small_head_groups(groups_of_three, monkeypatch, variant):
    key = ("fwd", 128, True)
    monkeypatch.setitem(fa._HOPPER, key, fa._HOPPER[key]._replace(variant=variant))
    check(2, 4, 2, 1000, 1000, 128, True, torch.bfloat16, device="cuda")
