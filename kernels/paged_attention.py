"""Paged KV cache kernels in Triton: write_kv (scatter through a slot mapping) and
paged_decode_attention (one query token per sequence against its blocks), GQA-aware.

Decode layout and numerics:
  - one program per (sequence, kv head, context split): the H / H_kv query heads that read
    the same kv head are a [G_PAD, D_PAD] tile, so each K/V block is loaded once for all of
    them;
  - online softmax over whole cache blocks in fp32 (scores, running max/sum, accumulator),
    the scale folded into q; inputs may be fp32/fp16/bf16, the output has q's dtype;
  - flash-decoding: with num_splits > 1 each program covers a contiguous range of blocks and
    writes its normalised partial output and log-sum-exp; `_combine` merges the splits with
    weights exp(lse_s - max lse). An empty range (past the sequence's end) has lse = -inf and
    weight 0; a sequence of length 0 gives a zero row.
Scores are a broadcast multiply-and-sum rather than tl.dot: a decode tile has only
G (often 1-8) query rows, under tl.dot's 16-row minimum, and the kernel is bound by the
K/V bytes it reads, not by FLOPs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(Q, K, V, O, Lse, BT, SL, scale,
                   sq_b, sq_h, sk_blk, sk_tok, sk_h, sbt_b, so_b, so_h, so_s, sl_b, sl_h,
                   blocks_per_split,
                   GROUPS: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    dd = tl.arange(0, D_PAD)
    t = tl.arange(0, BLOCK)
    gmask = g < GROUPS
    dmask = dd < HEAD_DIM
    heads = kvh * GROUPS + g
    seq_len = tl.load(SL + b)
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + dd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(seq_len, BLOCK))
    for blk in range(first, last):
        phys = tl.load(BT + b * sbt_b + blk).to(tl.int64)
        tok = blk * BLOCK + t
        tmask = tok < seq_len
        offs = phys * sk_blk + t[:, None] * sk_tok + kvh * sk_h + dd[None, :]
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(K + offs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(tmask[None, :], s, float("-inf"))
        # Every block in range holds at least one token, so m_new is finite from here on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(V + offs, mask=kv_mask, other=0.0).to(tl.float32)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / tl.maximum(lsum, 1e-30)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        lse = tl.where(lsum > 0, m + tl.log(tl.maximum(lsum, 1e-30)), float("-inf"))
        tl.store(Lse + b * sl_b + heads * sl_h + split, lse, mask=gmask)
        tl.store(O + b * so_b + heads[:, None] * so_h + split * so_s + dd[None, :], out, mask=omask)
    else:
        tl.store(O + b * so_b + heads[:, None] * so_h + dd[None, :], out.to(O.dtype.element_ty), mask=omask)


@triton.jit
def _write_kv_kernel(K, V, KC, VC, SM, sk_n, sk_h, sv_n, sv_h, sc_blk, sc_tok, sc_h,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    dd = tl.arange(0, D_PAD)
    slot = tl.load(SM + n)
    # Padding tokens (slot < 0) write nothing.
    mask = (dd < HEAD_DIM) & ((dd * 0 + slot) >= 0)  # broadcast first: the interpreter wants a tensor mask
    dst = (slot // BLOCK) * sc_blk + (slot % BLOCK) * sc_tok + h * sc_h + dd
    tl.store(KC + dst, tl.load(K + n * sk_n + h * sk_h + dd, mask=mask), mask=mask)
    tl.store(VC + dst, tl.load(V + n * sv_n + h * sv_h + dd, mask=mask), mask=mask)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


def default_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over (flash-decoding), at least 4 blocks each."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, batch * kv_heads))
    return max(1, min(want, max_blocks // 4))


def _combine(o: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merges split outputs o [B, H, S, d] with their log-sum-exps lse [B, H, S]."""
    top = lse.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(lse - top)
    out = (w[..., None] * o).sum(dim=2) / w.sum(dim=-1).clamp_min(1e-30)[..., None]
    return out.to(dtype)


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                  scale: float, num_splits: int = 0) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("paged_decode_attention (triton): caches must share a layout with unit-stride head_dim")
    groups = heads // kv_heads
    max_blocks = block_tables.shape[1]
    splits = num_splits or default_splits(batch, kv_heads, max_blocks, q.device)
    splits = max(1, min(splits, max_blocks))
    per_split = -(-max_blocks // splits)
    splits = -(-max_blocks // per_split)
    meta = dict(GROUPS=groups, G_PAD=_pow2(groups, 2), HEAD_DIM=head_dim, D_PAD=_pow2(head_dim, 16),
                BLOCK=block, SPLIT=splits > 1)
    grid = (batch, kv_heads, splits)
    args = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0))
    if splits == 1:
        out = torch.empty(batch, heads, head_dim, device=q.device, dtype=q.dtype)
        _decode_kernel[grid](q, k_cache, v_cache, out, out, block_tables, seq_lens, scale, *args,
                             out.stride(0), out.stride(1), 0, 0, 0, per_split, **meta)
        return out
    part = torch.empty(batch, heads, splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    _decode_kernel[grid](q, k_cache, v_cache, part, lse, block_tables, seq_lens, scale, *args,
                         part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                         per_split, **meta)
    return _combine(part, lse, q.dtype)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    tokens, kv_heads, head_dim = k.shape
    if k_cache.stride() != v_cache.stride() or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("write_kv (triton): caches must share a layout; head_dim must be unit-stride")
    if tokens == 0:
        return
    _write_kv_kernel[(tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, D_PAD=_pow2(head_dim, 16), BLOCK=k_cache.shape[1])
