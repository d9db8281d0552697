"""Sort-free CFG sampling in Triton: guidance, CD-K, temperature, TopK, TopP and one draw.

One program per row; each pass streams the row in BLOCK-sized chunks and recomputes the
guided logits from the input instead of writing an fp32 copy (the cond + uncond loads in
bf16 cost the same bytes as re-reading an fp32 scratch row, and no barrier is needed).
All math is fp32. TopK/TopP thresholds come from a multi-pivot search over order-preserving
int32 keys of the fp32 values: each pass tests NPIV pivots at once, so the key interval
shrinks NPIV-fold per pass and the cut is exact (the k-th largest value; the smallest value
whose strictly-greater mass is below p * Z) after ~8 passes, with no sort and no scratch.
The draw is an inverse CDF in id order (the reference's order) with one uniform per row
from splitmix64(seed, row), the same function as the C++ and CUDA kernels.
Imports triton and torch only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF_KEY = tl.constexpr(-2139095041)       # _order_key(-inf)
LOWEST_FINITE_KEY = tl.constexpr(-2139095040)  # _order_key(-FLT_MAX)
NPIV = 16
# (largest vocab, BLOCK, num_warps): small rows in one block; big rows in 1024-wide chunks
# so the [BLOCK, NPIV] pivot comparisons stay within the registers of 8 warps.
BLOCK_TABLE = ((256, 256, 2), (1024, 1024, 4), (1 << 62, 1024, 8))


@triton.jit
def _order_key(x):
    # Signed int32 keys that order like the floats: flip the magnitude bits of negatives.
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _row_uniform(seed, row):
    # splitmix64 of a per-row counter; uint64 arithmetic wraps. 53 bits -> [0, 1).
    z = seed.to(tl.uint64) + (row + 1).to(tl.uint64) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 11).to(tl.float64) * (1.0 / 9007199254740992.0)


@triton.jit
def _values(c_row, u_row, offs, vocab, start, end, scale, temp, lse_c, lse_u, cut,
            GUIDED: tl.constexpr, CDK: tl.constexpr, RAW_COND: tl.constexpr):
    """The row's sampling logits at `offs` (-inf outside [start, end) and past the vocab);
    RAW_COND gives the plain cond logits over the whole vocab (for CD-K's own top-k)."""
    # Lanes past the vocab load 0 (not -inf, which would make inf - inf in the mix) and are
    # masked to -inf below, either by the vocab check or by the allowed range (end <= vocab).
    inb = offs < vocab
    c = tl.load(c_row + offs, mask=inb, other=0.0).to(tl.float32)
    if RAW_COND:
        x = tl.where(inb, c, float("-inf"))
    else:
        if CDK:
            u = tl.load(u_row + offs, mask=inb, other=0.0).to(tl.float32)
            lc = c - lse_c
            keep = (c > float("-inf")) & (u > float("-inf")) & (lc >= cut)
            x = tl.where(keep, lc - (u - lse_u), float("-inf"))
        elif GUIDED:
            u = tl.load(u_row + offs, mask=inb, other=0.0).to(tl.float32)
            mixed = tl.where(scale == 1.0, c, tl.where(scale == 0.0, u, u + scale * (c - u)))
            x = tl.where((c == float("-inf")) | (u == float("-inf")), float("-inf"), mixed)
        else:
            x = c
        x = tl.where((offs >= start) & (offs < end), x / temp, float("-inf"))
        x = tl.where(x == 0.0, 0.0, x)  # -0 and +0 tie, as in the reference
    return x


@triton.jit
def _kth_key(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, k, hi_key,
             GUIDED: tl.constexpr, CDK: tl.constexpr, RAW_COND: tl.constexpr,
             BLOCK: tl.constexpr, NPIV: tl.constexpr):
    """Largest key T with count(key >= T) >= k (the k-th largest value); needs k <= #finite.
    Invariant: count(>= lo) >= k and count(>= hi + 1) < k."""
    lo = tl.full((), LOWEST_FINITE_KEY, tl.int64)
    hi = hi_key.to(tl.int64)
    j = tl.arange(0, NPIV) + 1
    while lo < hi:
        piv = lo + ((hi - lo) * j + NPIV - 1) // NPIV          # in (lo, hi], last == hi
        piv32 = piv.to(tl.int32)
        cnt = tl.zeros((NPIV,), tl.int32)
        for b0 in range(0, vocab, BLOCK):
            offs = b0 + tl.arange(0, BLOCK)
            key = _order_key(_values(c_row, u_row, offs, vocab, start, end, scale, temp,
                                     lse_c, lse_u, cut, GUIDED, CDK, RAW_COND))
            cnt += tl.sum((key[:, None] >= piv32[None, :]).to(tl.int32), axis=0)
        ok = cnt >= k
        lo = tl.max(tl.where(ok, piv, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, piv - 1), axis=0)
    return lo.to(tl.int32)


@triton.jit
def _mass(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, m, floor_key,
          GUIDED: tl.constexpr, CDK: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of exp(x - m) over keys >= floor_key (fp32 tree sums per block)."""
    z = tl.zeros((), tl.float32)
    for b0 in range(0, vocab, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        x = _values(c_row, u_row, offs, vocab, start, end, scale, temp, lse_c, lse_u, cut,
                    GUIDED, CDK, False)
        z += tl.sum(tl.where(_order_key(x) >= floor_key, tl.exp(x - m), 0.0), axis=0)
    return z


@triton.jit
def _top_p_key(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, m, floor_key,
               target, GUIDED: tl.constexpr, CDK: tl.constexpr, BLOCK: tl.constexpr,
               NPIV: tl.constexpr):
    """Smallest key T >= floor_key with mass(key > T) < target (mass over keys >= floor).
    Invariant: the answer lies in [lo, hi]; hi = key(max) always qualifies (mass 0)."""
    lo = floor_key.to(tl.int64)
    hi = _order_key(m).to(tl.int64)
    j = tl.arange(0, NPIV)
    while lo < hi:
        piv = lo + ((hi - lo) * j) // NPIV                     # in [lo, hi), first == lo
        piv32 = piv.to(tl.int32)
        above = tl.zeros((NPIV,), tl.float32)
        for b0 in range(0, vocab, BLOCK):
            offs = b0 + tl.arange(0, BLOCK)
            x = _values(c_row, u_row, offs, vocab, start, end, scale, temp, lse_c, lse_u, cut,
                        GUIDED, CDK, False)
            key = _order_key(x)
            e = tl.where(key >= floor_key, tl.exp(x - m), 0.0)
            above += tl.sum(tl.where(key[:, None] > piv32[None, :], e[:, None], 0.0), axis=0)
        ok = above < target
        hi = tl.min(tl.where(ok, piv, hi), axis=0)
        lo = tl.max(tl.where(ok, lo, piv + 1), axis=0)
    return lo.to(tl.int32)


@triton.jit
def _cfg_sample_kernel(logits_ptr, row_stride, batch, vocab, scale_ptr, temp_ptr, k_ptr, p_ptr,
                       allowed_ptr, seed_ptr, tokens_ptr, logprobs_ptr, status_ptr,
                       cd_log_alpha, cd_k, GUIDED: tl.constexpr, CDK: tl.constexpr,
                       BLOCK: tl.constexpr, NPIV: tl.constexpr):
    row = tl.program_id(0)
    c_row = logits_ptr + row.to(tl.int64) * row_stride
    u_row = logits_ptr + (row + batch).to(tl.int64) * row_stride  # read only when GUIDED
    scale = tl.load(scale_ptr + row)
    t = tl.load(temp_ptr + row)
    greedy = t == 0.0
    temp = tl.where(greedy, 1.0, t)  # greedy rows report log-probs at temperature 1
    k = tl.load(k_ptr + row)
    p = tl.load(p_ptr + row)
    start = tl.minimum(tl.maximum(tl.load(allowed_ptr + 2 * row), 0), vocab)
    end = tl.minimum(tl.maximum(tl.load(allowed_ptr + 2 * row + 1), start), vocab)
    big = 1 << 30

    # Raw inputs: NaN anywhere in the row pair (the reference checks the whole tensor) and,
    # for CD-K, each row's max and finite count.
    nan = tl.zeros((), tl.int32)
    mc = tl.full((), float("-inf"), tl.float32)
    mu = tl.full((), float("-inf"), tl.float32)
    fin_c = tl.zeros((), tl.int32)
    for b0 in range(0, vocab, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        c = tl.load(c_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        nan = tl.maximum(nan, tl.max((c != c).to(tl.int32), axis=0))
        mc = tl.maximum(mc, tl.max(c, axis=0))
        fin_c += tl.sum((c > float("-inf")).to(tl.int32), axis=0)
        if GUIDED:
            u = tl.load(u_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            nan = tl.maximum(nan, tl.max((u != u).to(tl.int32), axis=0))
            mu = tl.maximum(mu, tl.max(u, axis=0))
    lse_c = 0.0
    lse_u = 0.0
    cut = 0.0
    if CDK:
        # log-normalisers of both rows (max-shifted sums), then CD-K's plausibility cut at
        # alpha times the k-th largest p_c, found with the same pivot search on raw cond.
        sc = tl.zeros((), tl.float32)
        su = tl.zeros((), tl.float32)
        for b0 in range(0, vocab, BLOCK):
            offs = b0 + tl.arange(0, BLOCK)
            c = tl.load(c_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            u = tl.load(u_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            sc += tl.sum(tl.exp(c - mc), axis=0)
            su += tl.sum(tl.exp(u - mu), axis=0)
        lse_c = mc + tl.log(sc)
        lse_u = mu + tl.log(su)
        kk = tl.minimum(cd_k, vocab)
        kth = tl.full((), float("-inf"), tl.float32)
        if (kk <= fin_c) & (nan == 0):
            kth = _key_value(_kth_key(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u,
                                      cut, kk, _order_key(mc), GUIDED, CDK, True, BLOCK, NPIV))
        cut = (kth - lse_c) + cd_log_alpha

    # The row's sampling logits: max, first argmax (greedy), finite count.
    m = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int32)
    n_fin = tl.zeros((), tl.int32)
    for b0 in range(0, vocab, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        x = _values(c_row, u_row, offs, vocab, start, end, scale, temp, lse_c, lse_u, cut,
                    GUIDED, CDK, False)
        bm = tl.max(x, axis=0)
        bi = tl.min(tl.where(x == bm, offs, big), axis=0)
        arg = tl.where(bm > m, bi, arg)   # strict: an earlier block keeps a tie
        m = tl.maximum(m, bm)
        n_fin += tl.sum((x > float("-inf")).to(tl.int32), axis=0)
    status = tl.where(nan > 0, 1, tl.where(m == float("-inf"), 2, 0))
    ok = status == 0

    floor = tl.full((), NEG_INF_KEY, tl.int32)    # keep keys >= floor
    if ok & (k > 0) & (k < n_fin):
        floor = _kth_key(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, k,
                         _order_key(m), GUIDED, CDK, False, BLOCK, NPIV)
    if ok & (p < 1.0):
        zk = _mass(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, m, floor,
                   GUIDED, CDK, BLOCK)
        floor = _top_p_key(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, m,
                           floor, p * zk, GUIDED, CDK, BLOCK, NPIV)
    z = _mass(c_row, u_row, vocab, start, end, scale, temp, lse_c, lse_u, cut, m, floor,
              GUIDED, CDK, BLOCK)

    # Inverse CDF in id order: the first kept id whose running mass exceeds u * z.
    target = _row_uniform(tl.load(seed_ptr), row).to(tl.float32) * z
    run = tl.zeros((), tl.float32)
    pick = tl.full((), big, tl.int32)
    pick_x = tl.zeros((), tl.float32)
    last = tl.full((), -1, tl.int32)
    last_x = tl.zeros((), tl.float32)
    for b0 in range(0, vocab, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        x = _values(c_row, u_row, offs, vocab, start, end, scale, temp, lse_c, lse_u, cut,
                    GUIDED, CDK, False)
        e = tl.where(_order_key(x) >= floor, tl.exp(x - m), 0.0)
        hit = ((tl.cumsum(e, axis=0) + run) > target) & (e > 0.0)
        bi = tl.min(tl.where(hit, offs, big), axis=0)
        first = (pick == big) & (bi < big)
        pick_x = tl.where(first, tl.sum(tl.where(offs == bi, x, 0.0), axis=0), pick_x)
        pick = tl.where(first, bi, pick)
        bl = tl.max(tl.where(e > 0.0, offs, -1), axis=0)
        last_x = tl.where(bl >= 0, tl.sum(tl.where(offs == bl, x, 0.0), axis=0), last_x)
        last = tl.maximum(last, bl)
        run += tl.sum(e, axis=0)
    # u * z rounded up to the total: take the last kept id.
    pick_x = tl.where(pick == big, last_x, pick_x)
    pick = tl.where(pick == big, last, pick)
    pick_x = tl.where(greedy, m, pick_x)
    pick = tl.where(greedy, arg, pick)
    tl.store(tokens_ptr + row, tl.where(ok, pick, -1).to(tl.int64))
    tl.store(logprobs_ptr + row, tl.where(ok, (pick_x - m) - tl.log(z), float("nan")))
    tl.store(status_ptr + row, status)


def block_config(vocab: int) -> tuple[int, int]:
    for limit, block, warps in BLOCK_TABLE:
        if vocab <= limit:
            return block, warps
    raise AssertionError("BLOCK_TABLE ends with an unbounded row")


def cfg_sample_triton(logits: torch.Tensor, cfg_scale: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, allowed: torch.Tensor,
                      seed: torch.Tensor, guided: bool, cd_alpha: float, cd_k: int):
    """Same contract as torch.ops.engine.cfg_sample: per-row [B] parameters, allowed [B, 2]
    int64, seed int64 [1] on the logits' device; returns (tokens, logprobs, status [B] int32:
    0 ok, 1 NaN in the row pair, 2 no allowed finite logit)."""
    rows, vocab = logits.shape
    batch = rows // 2 if guided else rows
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.empty(batch, dtype=torch.float32, device=dev)
    status = torch.empty(batch, dtype=torch.int32, device=dev)
    if batch == 0:
        return tokens, logprobs, status
    block, warps = block_config(vocab)
    # fp32 log, as the reference adds torch.log(tensor(alpha)) to fp32 log-probs.
    log_alpha = float(torch.tensor(cd_alpha, dtype=torch.float32).log()) if cd_k > 0 else 0.0
    _cfg_sample_kernel[(batch,)](
        logits, logits.stride(0), batch, vocab, cfg_scale, temperature, top_k, top_p,
        allowed, seed, tokens, logprobs, status, log_alpha, cd_k,
        GUIDED=guided, CDK=cd_k > 0, BLOCK=block, NPIV=NPIV, num_warps=warps)
    return tokens, logprobs, status
