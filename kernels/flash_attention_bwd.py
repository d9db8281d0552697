"""Flash-attention backward in Triton: three kernels, no atomics.

With P = softmax(S), S = scale * Q K^T, O = P V and upstream dO:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,
    dK = scale * dS^T Q,          delta_i = rowsum(dO * O)_i  (= sum_j P_ij dP_ij).
P is rebuilt from the forward's log-sum-exp, so nothing of size [Sq, Sk] is stored.

Why two main kernels instead of one that also atomically adds dQ: the dK/dV kernel owns a
key block and loops over queries; the dQ kernel owns a query block and loops over keys.
Each output is written exactly once by one program, so the result is deterministic (run to
run and across GPUs), needs no fp32 dQ scratch buffer or zero-fill, and grouped-query heads
are reduced in registers: the dK/dV program of a kv head loops over its query heads. The
price is recomputing Q K^T and dO V^T in the dQ kernel (7 block matmuls instead of 5).

If the caller also differentiates the log-sum-exp output (dLSE), dS gains P * dLSE, which
is folded into delta (delta_i - dLSE_i) by the preprocess kernel at no extra cost.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.flash_attention_fwd import full_key_end, key_range, score_mask
from kernels.flash_attention_order import program_tile


@triton.jit
def flash_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    sob, soh, sos, sdob, sdoh, sdos, sdod,
    H, SQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < SQ) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * SQ + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < SQ, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < SQ)


@triton.jit
def query_range(offs_n, SQ, SK, k_doc_start, k_doc_end, BLOCK_M: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """[lo, hi) query range that can see the keys `offs_n`; lo is BLOCK_M-aligned."""
    lo = 0
    hi = SQ
    if CAUSAL:
        # Query i sees key j when i >= j - (SK - SQ).
        lo = tl.maximum(tl.min(offs_n) - (SK - SQ), 0)
    if VARLEN:
        lo = tl.maximum(lo, tl.min(k_doc_start))
        hi = tl.max(k_doc_end)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def full_query_start(start_n, lo, hi, SQ, SK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """Start of the query blocks in [lo, hi) that see every key of the block at start_n, so
    need no score mask: causally, rows i >= start_n + BLOCK_N - 1 - (SK - SQ). Key rows past
    SK and query rows past SQ need none either: they load as zeros, which add exactly 0 to
    dK and dV of the real keys (P^T dO with dO = 0; dS^T Q with Q = 0), and the padded keys'
    own dK/dV are never stored. Packed documents are masked everywhere."""
    if VARLEN:
        return hi
    start = lo
    if CAUSAL:
        first = start_n + BLOCK_N - 1 - (SK - SQ)
        start = tl.maximum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    return tl.minimum(start, hi)


@triton.jit
def dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_start_base,
                      doc_end_base, sqs, sqd, sdos, sdod, offs_n, offs_d, start, stop, SQ, SK,
                      scale_log2, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [start, stop) of one head."""
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < SQ
        q_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=q_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :] * sdod, mask=q_ok,
                     other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        # Transposed scores S^T [BLOCK_N, BLOCK_M], so P^T and dS^T feed dV and dK directly.
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            q_doc_start = offs_m
            q_doc_end = offs_m
            if VARLEN:
                q_doc_start = tl.load(doc_start_base + offs_m, mask=m_ok, other=SQ)
                q_doc_end = tl.load(doc_end_base + offs_m, mask=m_ok, other=0)
            mask_t = score_mask(offs_m[None, :], offs_n[:, None], SQ, SK, q_doc_start[None, :],
                                q_doc_end[None, :], CAUSAL, VARLEN)
            # Masked entries may overflow exp2 (padded rows have lse 0); select, never multiply.
            pt = tl.where(mask_t, tl.math.exp2(st - lse[None, :]), 0.0)
        else:
            pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d,
                  start, stop, SQ, SK, scale_log2, q_doc_start, q_doc_end,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [start, stop)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * sks + offs_d[None, :] * skd
        v_ptrs = v_base + offs_n[:, None] * svs + offs_d[None, :] * svd
        if MASKED:
            kv_ok = (offs_n < SK)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            mask = score_mask(offs_m[:, None], offs_n[None, :], SQ, SK, q_doc_start[:, None],
                              q_doc_end[:, None], CAUSAL, VARLEN)
            p = tl.where(mask, tl.math.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    H, GROUPS, SQ, SK, scale, scale_log2, HEAD_GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Under causal masking the first key blocks are seen by the most queries: they go first.
    pid_n, pid_bkv = program_tile(tl.cdiv(SK, BLOCK_N), HEAD_GROUP, False)
    HKV = H // GROUPS
    b = (pid_bkv // HKV).to(tl.int64)
    kvh = pid_bkv % HKV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < SK
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_ok, other=0.0)

    k_doc_start = offs_n
    k_doc_end = offs_n
    if VARLEN:
        k_doc_start = tl.load(DOC_START + b * SK + offs_n, mask=n_ok, other=SK)
        k_doc_end = tl.load(DOC_END + b * SK + offs_n, mask=n_ok, other=0)
    lo, hi = query_range(offs_n, SQ, SK, k_doc_start, k_doc_end, BLOCK_M, CAUSAL, VARLEN)

    # Near the causal diagonal (and for packed documents) scores need the mask; query
    # blocks from `mid` on see every key of this block, so they skip it.
    mid = full_query_start(pid_n * BLOCK_N, lo, hi, SQ, SK, BLOCK_M, BLOCK_N, CAUSAL, VARLEN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUPS):
        h = kvh * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * H + h) * SQ
        dk, dv = dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, DOC_START + b * SQ,
            DOC_END + b * SQ, sqs, sqd, sdos, sdod, offs_n, offs_d, lo, mid, SQ, SK, scale_log2,
            HEAD_DIM, BLOCK_M, CAUSAL, VARLEN, True, DOT_PRECISION)
        dk, dv = dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, DOC_START + b * SQ,
            DOC_END + b * SQ, sqs, sqd, sdos, sdod, offs_n, offs_d, mid, hi, SQ, SK, scale_log2,
            HEAD_DIM, BLOCK_M, CAUSAL, VARLEN, False, DOT_PRECISION)

    dk *= scale
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs,
    H, GROUPS, SQ, SK, scale, scale_log2, HEAD_GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh = program_tile(tl.cdiv(SQ, BLOCK_M), HEAD_GROUP, CAUSAL)   # as the forward
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = h // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < SQ
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=q_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=q_ok, other=0.0)
    row = pid_bh.to(tl.int64) * SQ + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)

    q_doc_start = offs_m
    q_doc_end = offs_m
    if VARLEN:
        q_doc_start = tl.load(DOC_START + b * SQ + offs_m, mask=m_ok, other=SQ)
        q_doc_end = tl.load(DOC_END + b * SQ + offs_m, mask=m_ok, other=0)
    lo, hi = key_range(offs_m, SQ, SK, q_doc_start, q_doc_end, BLOCK_M, BLOCK_N, CAUSAL, VARLEN)

    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Whole, fully visible key blocks first (no score mask), then the diagonal and ragged end.
    mid = full_key_end(pid_m * BLOCK_M, lo, hi, SQ, SK, BLOCK_N, CAUSAL, VARLEN)
    dq = dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d,
                       lo, mid, SQ, SK, scale_log2, q_doc_start, q_doc_end, HEAD_DIM, BLOCK_D,
                       BLOCK_N, CAUSAL, VARLEN, False, DOT_PRECISION)
    dq = dq_key_blocks(dq, q, do, lse, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d,
                       mid, hi, SQ, SK, scale_log2, q_doc_start, q_doc_end, HEAD_DIM, BLOCK_D,
                       BLOCK_N, CAUSAL, VARLEN, True, DOT_PRECISION)

    dq *= scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_ok)
