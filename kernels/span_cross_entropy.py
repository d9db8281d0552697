"""Fused linear + span-masked cross-entropy in Triton; the [n, V] logits never reach memory.

Cut Cross-Entropy's idea: rows without a target are dropped first (compaction), then each
program multiplies a [BM, d] block of hidden rows by [BV, d] blocks of the classifier and folds
the tile straight into an online log-sum-exp. Backward recomputes the same tiles, turns them
into d_logits in registers and multiplies them out into d_hidden and d_weight at once.

Numerics: tiles are accumulated in fp32 (`tl.dot` into an fp32 accumulator; fp32 inputs use
IEEE products, not TF32, so fp32 callers get fp32 answers); the log-sum-exp, softcap, z-loss
and smoothing terms are fp32; d_hidden / d_weight are summed in fp32 buffers by atomic adds
and rounded to the input dtype once at the end. The d_logits tile is rounded to the input
dtype before its two matmuls (as cuBLAS's backward of the plain loss does for bf16).

Loss per target row, with c = softcap * tanh(z / softcap) (or c = z) and lse = logsumexp(c):
    lse - (1 - eps) * c[t] - (eps / V) * sum_j c[j] + z_loss * lse^2
and its gradient in c:  p_j * (1 + 2 z_loss lse) - (1 - eps) [j == t] - eps / V,
times 1 - (c / softcap)^2 under a softcap.

`filter_eps > 0` (off by default) is APPROXIMATE: backward skips a [BM, BV] tile when every
softmax probability in it is below filter_eps and no row's target lies in it, dropping
gradients of at most filter_eps per element (CCE's gradient filtering; 2**-12 is below bf16's
resolution relative to 1). It needs label_smoothing == 0, whose eps / V term touches every tile.

Public: `span_cross_entropy(...)` and the custom ops `engine::span_cross_entropy_triton_fwd`
/ `_bwd` (fakes and autograd registered, so torch.compile and opcheck see them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")

# (BM rows, BV vocab, BK reduction) tile, warps, pipeline stages; keyed on (fp32?, large d?).
# 16-bit inputs: 128x128 tiles fill Hopper's tensor-core MMA and, at d >= 2048, a K loop long
# enough that 4 stages hide the loads. fp32 tiles take twice the shared memory per element,
# so BK halves and the stages drop. Backward holds a d_logits tile next to the logits and two
# extra operand tiles, so it uses a narrower BV to stay within registers.
_FWD_BLOCKS = {
    (False, True): (128, 128, 64, 8, 4),
    (False, False): (64, 128, 64, 4, 3),
    (True, True): (64, 64, 32, 4, 3),
    (True, False): (64, 64, 32, 4, 2),
}
_BWD_BLOCKS = {
    (False, True): (128, 64, 64, 8, 3),
    (False, False): (64, 64, 64, 4, 3),
    (True, True): (64, 64, 32, 4, 2),
    (True, False): (64, 64, 32, 4, 2),
}
# The CPU interpreter runs every tile op as one numpy call, so its cost follows the number of
# tiles, not their size: wide vocabulary tiles make the 64,512-column tests affordable there.
_INTERPRETER_BLOCKS = (32, 512, 32, 1, 1)
_GROUP_M = 8  # backward visits row tiles in groups of 8 so a weight block is reused from L2


def _blocks(table, hidden: torch.Tensor):
    if hidden.device.type != "cuda":
        return _INTERPRETER_BLOCKS
    return _gpu_blocks(table, hidden)


def _gpu_blocks(table, hidden: torch.Tensor):
    return table[(hidden.dtype == torch.float32, hidden.shape[1] >= 2048)]


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    # softcap * tanh(z / softcap) from exp(-2|x|) <= 1: never overflows, and portable across
    # triton versions (no libdevice tanh in the interpreter).
    if HAS_SOFTCAP:
        x = z / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(x < 0, -t, t)
    return z


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, part_ptr, n, V, D, stride_h, stride_w, v_per_split,
                softcap, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    # One program: BM rows x one slice of the vocabulary. It leaves four partials per row
    # (running max, sum of exp below it, sum of logits, the target's logit) that the launcher
    # merges across slices; splitting V keeps every SM busy when n is small.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < n
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BM,), dtype=tl.float32)
    csum = tl.zeros((BM,), dtype=tl.float32)
    ct = tl.zeros((BM,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        cols = (v0 + tl.arange(0, BV)).to(tl.int64)
        cmask = cols < v_hi
        c = _capped(_logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                                BM, BV, BK, IEEE), softcap, HAS_SOFTCAP)
        valid = cmask[None, :]
        csum += tl.sum(tl.where(valid, c, 0.0), axis=1)
        ct += tl.sum(tl.where(cols[None, :] == tgt[:, None], c, 0.0), axis=1)
        # Online log-sum-exp: rescale the running sum to the new max. Each slice holds at least
        # one real column, so m is finite after the first tile and exp(-inf - m) is just 0.
        c = tl.where(valid, c, float("-inf"))
        m_new = tl.maximum(m, tl.max(c, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), axis=1)
        m = m_new
    out = part_ptr + pid_s * 4 * n + rows
    tl.store(out, m, mask=rmask)
    tl.store(out + n, s, mask=rmask)
    tl.store(out + 2 * n, csum, mask=rmask)
    tl.store(out + 3 * n, ct, mask=rmask)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, n, V, D,
                stride_h, stride_w, softcap, two_z, target_coef, smooth_coef, filter_eps,
                HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(n, BM)
    num_v = tl.cdiv(V, BV)
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_v * BV + tl.arange(0, BV)).to(tl.int64)
    rmask = rows < n
    cmask = cols < V
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)

    c = _capped(_logit_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                            BM, BV, BK, IEEE), softcap, HAS_SOFTCAP)
    valid = rmask[:, None] & cmask[None, :]
    p = tl.where(valid, tl.exp(c - lse[:, None]), 0.0)
    is_tgt = (cols[None, :] == tgt[:, None]) & valid
    dc = p * (1.0 + two_z * lse)[:, None] - tl.where(is_tgt, target_coef, 0.0) \
        - tl.where(valid, smooth_coef, 0.0)
    if HAS_SOFTCAP:
        dc = dc * (1.0 - (c / softcap) * (c / softcap))
    dz = (dc * g[:, None]).to(h_ptr.dtype.element_ty)

    # filter_eps == 0 keeps every tile (p >= 0); see the module docstring for > 0.
    live = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (tl.sum(is_tgt.to(tl.int32)) > 0)
    if live:
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            if IEEE:
                dh = tl.dot(dz, w, input_precision="ieee")
                dw = tl.dot(tl.trans(dz), h, input_precision="ieee")
            else:
                dh = tl.dot(dz, w)
                dw = tl.dot(tl.trans(dz), h)
            tl.atomic_add(dh_ptr + rows[:, None] * D + ks[None, :], dh,
                          mask=rmask[:, None] & kmask[None, :], sem="relaxed")
            tl.atomic_add(dw_ptr + cols[:, None] * D + ks[None, :], dw,
                          mask=cmask[:, None] & kmask[None, :], sem="relaxed")


def _check(hidden, weight, targets, reduction, label_smoothing, filter_eps):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, d] and weight [V, d]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype; got {hidden.dtype}, {weight.dtype}")
    if filter_eps > 0 and label_smoothing > 0:
        raise ValueError("gradient filtering needs label_smoothing == 0 (smoothing touches every tile)")


def _compact(hidden, targets, ignore_index):
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, hidden.index_select(0, rows), targets.index_select(0, rows).contiguous()


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few slices, so the cross-slice merge is exercised by tests


def _forward(hidden, weight, targets, ignore_index, reduction, z_loss, label_smoothing, softcap):
    n_all, d = hidden.shape
    V = weight.shape[0]
    rows, h, t = _compact(hidden, targets, ignore_index)
    w = weight.contiguous()
    n = rows.numel()
    lse_all = hidden.new_zeros(n_all, dtype=torch.float32)
    if n == 0:
        loss = lse_all.clone() if reduction == "none" else lse_all.new_zeros(())
        return loss, lse_all
    BM, BV, BK, warps, stages = _blocks(_FWD_BLOCKS, hidden)
    row_blocks = triton.cdiv(n, BM)
    splits = max(1, min(triton.cdiv(V, BV), triton.cdiv(_target_programs(hidden.device), row_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), BV) * BV
    splits = triton.cdiv(V, v_per_split)  # every slice is non-empty
    part = torch.empty(splits, 4, n, device=hidden.device, dtype=torch.float32)
    _fwd_kernel[(row_blocks, splits)](
        h, w, t, part, n, V, d, h.stride(0), w.stride(0), v_per_split,
        float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, IEEE=hidden.dtype == torch.float32,
        BM=BM, BV=BV, BK=BK, num_warps=warps, num_stages=stages)
    m, s, csum, ct = part.unbind(1)
    top = m.max(0).values
    lse = top + (s * torch.exp(m - top)).sum(0).log()
    loss = lse - (1.0 - label_smoothing) * ct.sum(0)
    if label_smoothing:
        loss = loss - (label_smoothing / V) * csum.sum(0)
    if z_loss:
        loss = loss + z_loss * lse.square()
    lse_all.index_copy_(0, rows, lse)
    if reduction == "mean":
        return loss.sum() / n, lse_all
    if reduction == "sum":
        return loss.sum(), lse_all
    return torch.zeros_like(lse_all).index_copy_(0, rows, loss), lse_all


def _backward(grad, hidden, weight, targets, lse_all, ignore_index, reduction, z_loss,
              label_smoothing, softcap, filter_eps):
    n_all, d = hidden.shape
    V = weight.shape[0]
    rows, h, t = _compact(hidden, targets, ignore_index)
    w = weight.contiguous()
    n = rows.numel()
    d_hidden = torch.zeros(n_all, d, device=hidden.device, dtype=torch.float32)
    d_weight = torch.zeros(V, d, device=hidden.device, dtype=torch.float32)
    if n > 0:
        if reduction == "none":
            g = grad.float().index_select(0, rows).contiguous()
        else:
            scale = grad.float() / n if reduction == "mean" else grad.float()
            g = scale.expand(n).contiguous()
        dh = torch.zeros(n, d, device=hidden.device, dtype=torch.float32)
        BM, BV, BK, warps, stages = _blocks(_BWD_BLOCKS, hidden)
        grid = (triton.cdiv(n, BM) * triton.cdiv(V, BV),)
        _bwd_kernel[grid](
            h, w, t, lse_all.index_select(0, rows).contiguous(), g, dh, d_weight, n, V, d,
            h.stride(0), w.stride(0), float(softcap or 1.0), 2.0 * z_loss, 1.0 - label_smoothing,
            label_smoothing / V, float(filter_eps), HAS_SOFTCAP=softcap is not None,
            IEEE=hidden.dtype == torch.float32, BM=BM, BV=BV, BK=BK, GROUP_M=_GROUP_M,
            num_warps=warps, num_stages=stages)
        d_hidden.index_copy_(0, rows, dh)
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype)


@torch.library.custom_op("engine::span_cross_entropy_triton_fwd", mutates_args=())
def span_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int, reduction: str, z_loss: float,
                           label_smoothing: float, softcap: float | None, filter_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse [N] fp32, 0 on ignored rows); lse is what backward needs to rebuild p.

    filter_eps is only read by the registered backward; it is an input so that the choice
    travels with the op through tracing instead of through global state."""
    return _forward(hidden, weight, targets, ignore_index, reduction, z_loss, label_smoothing,
                    softcap)


@span_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, reduction, z_loss, label_smoothing, softcap,
      filter_eps):
    lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    loss = lse.new_empty(hidden.shape[:1] if reduction == "none" else ())
    return loss, lse


@torch.library.custom_op("engine::span_cross_entropy_triton_bwd", mutates_args=())
def span_cross_entropy_bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           targets: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                           reduction: str, z_loss: float, label_smoothing: float,
                           softcap: float | None, filter_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad, hidden, weight, targets, lse, ignore_index, reduction, z_loss,
                     label_smoothing, softcap, filter_eps)


@span_cross_entropy_bwd.register_fake
def _(grad, hidden, weight, targets, lse, ignore_index, reduction, z_loss, label_smoothing,
      softcap, filter_eps):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.options = options


def _autograd_backward(ctx, grad_loss, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    d_hidden, d_weight = span_cross_entropy_bwd(grad_loss, hidden, weight, targets, lse,
                                                *ctx.options)
    return d_hidden, d_weight, None, None, None, None, None, None, None


torch.library.register_autograd("engine::span_cross_entropy_triton_fwd", _autograd_backward,
                                setup_context=_setup_context)


def span_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                       label_smoothing: float = 0.0, softcap: float | None = None,
                       filter_eps: float = 0.0) -> torch.Tensor:
    """Triton fused linear + CE over target rows; see the module docstring for filter_eps."""
    _check(hidden, weight, targets, reduction, label_smoothing, filter_eps)
    loss, _ = span_cross_entropy_fwd(hidden, weight, targets, int(ignore_index), reduction,
                                     float(z_loss), float(label_smoothing),
                                     None if softcap is None else float(softcap),
                                     float(filter_eps))
    return loss
