"""Flash-attention forward in Triton: online softmax over key blocks, fp32 accumulation.

One program computes one block of BLOCK_M query rows of one (batch, query head). It streams
key/value blocks, keeping a running row maximum `m`, a running denominator `l` and an fp32
output accumulator; each new block rescales the old state by exp(m_old - m_new), so the
[Sq, Sk] score matrix never exists in memory. Scores live in the log2 domain (the softmax
scale is pre-multiplied by log2(e)) so the exponentials are `exp2`, which maps to a single
hardware instruction. The log-sum-exp of every row is written (natural log, fp32) for the
backward pass, which rebuilds the probabilities from it instead of storing them.

Masks: causal is aligned bottom-right (query i sees keys j <= i + Sk - Sq). Packed documents
arrive as per-token [start, end) key ranges of the token's document within its row
(DOC_START / DOC_END, int32 [B, S]); the loop bounds skip every key block that lies outside
the union of the query block's documents, so packed rows cost about the sum of the squared
document lengths, not S^2.

Each program's key loop runs in two parts: first the whole key blocks that every row of the
query block sees (no score mask, no load masks: the hot loop), then the blocks on the causal
diagonal and the ragged end of the keys, masked. Packed documents take the masked loop
throughout. The backward kernels split their loops the same way.

Ways to run the key loop (kernels/flash_attention.py picks one per tile-table entry):
pointers with masked loads (any strides, any GPU); Hopper's tensor-memory accelerator (TMA)
through tensor descriptors of the whole [B, H, S, d] tensors, made on the host and passed as
kernel arguments, which copies whole tiles into shared memory with the copy engine instead
of the threads; either of them with lazy rescaling (the accumulator is rescaled only when a
row maximum jumps by more than 2^8, FlashAttention-4's trick). Adding them left the plain
pointer path's sm_90 code unchanged (Triton 3.6); the launch order (flash_attention_order.py)
later changed only how a program finds its tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.flash_attention_order import program_tile

LOG2E = 1.4426950408889634
# A finite stand-in for -inf as the initial running max: a row whose keys are all masked in
# the current block then gets p = exp2(-inf - MIN) = 0 and a rescale factor of exp2(0) = 1,
# instead of the NaN that exp2(-inf - -inf) would give.
NEG_BIG = tl.constexpr(-1.0e30)
# The lazy rescale's threshold, in log2 units: a running maximum may lag the true one by up
# to this before the accumulator is rescaled (FlashAttention-4 uses the same 2^8).
LAZY_RESCALE_LOG2 = tl.constexpr(8.0)


@triton.jit
def key_range(offs_m, SQ, SK, q_doc_start, q_doc_end, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """[lo, hi) key range that the query rows `offs_m` can see; lo is BLOCK_N-aligned."""
    lo = 0
    hi = SK
    if CAUSAL:
        last_q = tl.minimum(tl.max(offs_m), SQ - 1)
        hi = tl.minimum(hi, last_q + 1 + SK - SQ)
    if VARLEN:
        lo = tl.min(q_doc_start)
        hi = tl.minimum(hi, tl.max(q_doc_end))
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def score_mask(qi, kj, SQ, SK, q_doc_start, q_doc_end, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """True where query qi may attend key kj. The arguments are broadcastable 2-D index
    tiles (q_doc_* shaped like qi), so the same code yields S or S^T orientation."""
    mask = (kj < SK) & (qi < SQ)
    if CAUSAL:
        mask = mask & (kj <= qi + (SK - SQ))
    if VARLEN:
        mask = mask & (kj >= q_doc_start) & (kj < q_doc_end)
    return mask


@triton.jit
def full_key_end(start_m, lo, hi, SQ, SK, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 VARLEN: tl.constexpr):
    """End of the key blocks in [lo, hi) that every query row from start_m on sees whole:
    no key past SK, none beyond the causal diagonal. Those blocks need no score mask; the
    rest, up to hi, do. Packed documents are masked everywhere (their edges fall anywhere)."""
    if VARLEN:
        return lo
    end = SK
    if CAUSAL:
        # Row start_m (the block's first) sees keys j <= start_m + SK - SQ.
        end = tl.minimum(end, start_m + 1 + SK - SQ)
    end = (end // BLOCK_N) * BLOCK_N
    return tl.minimum(tl.maximum(end, lo), hi)


@triton.jit
def mask_tma_scores(s, qi, kj, SQ, SK, q_doc_start, q_doc_end, CAUSAL: tl.constexpr,
                    VARLEN: tl.constexpr, EVEN_K: tl.constexpr):
    """The forward's score mask for tiles read by TMA, keeping only the tests that can fail
    on the diagonal and the ragged end. Query rows past SQ are never stored and see at least
    one key, so need none; keys past SK arrive as zeros and need one unless SK is a multiple
    of BLOCK_N (EVEN_K: no block reaches past SK)."""
    if CAUSAL:
        s = tl.where(kj <= qi + (SK - SQ), s, float("-inf"))
    if VARLEN:
        s = tl.where((kj >= q_doc_start) & (kj < q_doc_end), s, float("-inf"))
    if not EVEN_K:
        s = tl.where(kj < SK, s, float("-inf"))
    return s


@triton.jit
def fwd_step(acc, l_i, m_i, q, kt, v, offs_m, offs_n, SQ, SK, scale_log2, q_doc_start,
             q_doc_end, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr,
             DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False,
             EVEN_K: tl.constexpr = False, LAZY_RESCALE: tl.constexpr = False):
    """One online-softmax update with the key block kt [d, BLOCK_N] and values v."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if MASKED:
        if TMA:
            s = mask_tma_scores(s, offs_m[:, None], offs_n[None, :], SQ, SK,
                                q_doc_start[:, None], q_doc_end[:, None], CAUSAL, VARLEN, EVEN_K)
        else:
            mask = score_mask(offs_m[:, None], offs_n[None, :], SQ, SK, q_doc_start[:, None],
                              q_doc_end[:, None], CAUSAL, VARLEN)
            s = tl.where(mask, s, float("-inf"))
    # The scale (> 0) is applied after the row max and inside the exponent's argument,
    # so each score costs one fused multiply-add before exp2 instead of a multiply and
    # a subtract.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    if LAZY_RESCALE:
        # Rescale only when some row's maximum grew by more than 2^LAZY_RESCALE_LOG2 (a
        # block-wide test, so the branch is uniform): otherwise keep the old maximum, and
        # P's entries reach at most 2^8, harmless in fp32 sums and in 16-bit P (relative
        # precision does not depend on size). It skips the [BLOCK_M, d] multiply of the
        # accumulator on almost every block: for a 64x128 accumulator over 4 warps, 64 of
        # the ~340 instructions a thread runs per block in the hot loop (sm_90 SASS).
        if tl.max(m_new - m_i, 0) > LAZY_RESCALE_LOG2:
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.math.exp2(s * scale_log2 - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = acc + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_new = m_i
    else:
        p = tl.math.exp2(s * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # P is rounded to the input dtype for the tensor-core matmul (as every flash kernel
        # does); the sum above and the accumulator stay in fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d,
                   start, stop, SQ, SK, scale_log2, q_doc_start, q_doc_end,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """Online-softmax update over key blocks [start, stop), loading through pointers.
    MASKED=False is the hot loop: whole blocks that every row sees, so no score mask and
    no key-row load mask."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_n[None, :] * sks + offs_d[:, None] * skd
        v_ptrs = v_base + offs_n[:, None] * svs + offs_d[None, :] * svd
        if MASKED:
            n_ok = offs_n < SK
            kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc, l_i, m_i = fwd_step(acc, l_i, m_i, q, kt, v, offs_m, offs_n, SQ, SK, scale_log2,
                                 q_doc_start, q_doc_end, CAUSAL, VARLEN, MASKED, DOT_PRECISION,
                                 False, False, LAZY_RESCALE)
    return acc, l_i, m_i


@triton.jit
def fwd_key_blocks_tma(acc, l_i, m_i, q, K, V, b, kvh, offs_m, start, stop, SQ, SK,
                       scale_log2, q_doc_start, q_doc_end, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                       MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       EVEN_K: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """fwd_key_blocks with K and V read through tensor descriptors (Hopper's TMA engine):
    whole [1, 1, BLOCK_N, d] tiles of head (b, kvh) are copied into shared memory by the
    hardware, with rows past SK filled with zeros, so neither loop needs address arithmetic
    or load masks."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        kt = K.load([b, kvh, start_n, 0]).reshape([BLOCK_N, BLOCK_D]).T
        v = V.load([b, kvh, start_n, 0]).reshape([BLOCK_N, BLOCK_D])
        acc, l_i, m_i = fwd_step(acc, l_i, m_i, q, kt, v, offs_m, start_n + offs_n0, SQ, SK,
                                 scale_log2, q_doc_start, q_doc_end, CAUSAL, VARLEN, MASKED,
                                 DOT_PRECISION, True, EVEN_K, LAZY_RESCALE)
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE, DOC_START, DOC_END,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos,
    H, GROUPS, SQ, SK, scale_log2, HEAD_GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False,
    LAZY_RESCALE: tl.constexpr = False,
):
    """TMA=True: Q, K, V and O are not pointers but host-made tensor descriptors of the
    [B, H, S, d] tensors with [1, 1, rows, d] blocks (their strides then go unused). A tile
    is addressed by (batch, head, row), so it never reaches into the next head, and the
    ragged end needs no masks: rows past S read as zeros and are not written. The launcher
    makes them only where TMA can address the tensors (unit last stride, 16-byte aligned
    bases and strides, HEAD_DIM == BLOCK_D); the pointer path takes any strides. Descriptors
    made on the host live in the kernel's parameters: made in the kernel, each program wrote
    its four to global memory and fenced them before its first copy. EVEN_K (SK a multiple
    of BLOCK_N) lets TMA drop the key-bound test from its mask. LAZY_RESCALE rescales the
    accumulator only when a row maximum jumps (either loads)."""
    # Causal blocks near the end of the sequence do the most work: they go first, a few heads
    # at a time (flash_attention_order.py), so the grid does not end on long stragglers.
    pid_m, pid_bh = program_tile(tl.cdiv(SQ, BLOCK_M), HEAD_GROUP, CAUSAL)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = h // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < SQ

    if TMA:
        b32 = pid_bh // H   # descriptor coordinates are 32-bit
        q = Q.load([b32, h, pid_m * BLOCK_M, 0]).reshape([BLOCK_M, BLOCK_D])
    else:
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + kvh * skh
        v_base = V + b * svb + kvh * svh

    q_doc_start = offs_m
    q_doc_end = offs_m
    if VARLEN:
        q_doc_start = tl.load(DOC_START + b * SQ + offs_m, mask=m_ok, other=SQ)
        q_doc_end = tl.load(DOC_END + b * SQ + offs_m, mask=m_ok, other=0)
    lo, hi = key_range(offs_m, SQ, SK, q_doc_start, q_doc_end, BLOCK_M, BLOCK_N, CAUSAL, VARLEN)

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Whole, fully visible key blocks first (no masks), then the diagonal and the ragged end.
    mid = full_key_end(pid_m * BLOCK_M, lo, hi, SQ, SK, BLOCK_N, CAUSAL, VARLEN)
    if TMA:
        acc, l_i, m_i = fwd_key_blocks_tma(
            acc, l_i, m_i, q, K, V, b32, kvh, offs_m, lo, mid, SQ, SK, scale_log2, q_doc_start,
            q_doc_end, BLOCK_N, BLOCK_D, CAUSAL, VARLEN, False, DOT_PRECISION, EVEN_K,
            LAZY_RESCALE)
        acc, l_i, m_i = fwd_key_blocks_tma(
            acc, l_i, m_i, q, K, V, b32, kvh, offs_m, mid, hi, SQ, SK, scale_log2, q_doc_start,
            q_doc_end, BLOCK_N, BLOCK_D, CAUSAL, VARLEN, True, DOT_PRECISION, EVEN_K,
            LAZY_RESCALE)
    else:
        acc, l_i, m_i = fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, lo, mid, SQ,
            SK, scale_log2, q_doc_start, q_doc_end, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, VARLEN,
            False, DOT_PRECISION, LAZY_RESCALE)
        acc, l_i, m_i = fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, mid, hi, SQ,
            SK, scale_log2, q_doc_start, q_doc_end, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, VARLEN,
            True, DOT_PRECISION, LAZY_RESCALE)

    # Padded rows (beyond SQ) saw no key: keep them finite, they are not stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if TMA:
        O.store([b32, h, pid_m * BLOCK_M, 0],
                out.to(q.dtype).reshape([1, 1, BLOCK_M, BLOCK_D]))
    else:
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    tl.store(LSE + pid_bh.to(tl.int64) * SQ + offs_m, lse, mask=m_ok)
