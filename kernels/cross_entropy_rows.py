"""Cross-entropy over logit rows already in memory: loss, log-sum-exp and, in place, d_logits.

The GPU half of the chunked span loss (engine/ops/span_cross_entropy.py): cuBLAS writes a
block of target rows' logits in the input dtype, this kernel turns each row into its loss and
overwrites it with the row's gradient, and cuBLAS multiplies that back into d_hidden and
d_weight. Against the fully fused kernel (kernels/span_cross_entropy.py) it trades a
[rows, V] buffer for cuBLAS's matmuls and no atomics; against plain torch it replaces about
eight fp32 passes over the block (cast, cap, max, exp, sum, scale, scatter, cast back) by two
reads and one write in the input dtype.

Numerics match the reference: the logits are the matmul's, rounded to the input dtype as
`(h @ w.T).float()` rounds them; everything after is fp32 (online max / sum of exp, the target
and smoothing terms, z-loss, softcap); the gradient is rounded once to the input dtype, as
autograd's backward of that `.float()` rounds it. Loss per row (c = capped logits):
    lse - (1 - eps) c[t] - (eps / V) sum_j c[j] + z_loss lse^2
gradient in c: p_j (1 + 2 z_loss lse) - (1 - eps) [j == t] - eps / V, times the row's weight g
and, under a softcap, times 1 - (c / softcap)^2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.span_cross_entropy import _capped

# One program per row walks V in blocks of BLOCK columns, twice when it writes the gradient;
# the pass is memory-bound, so what matters is bytes in flight per SM. 4,096 columns over 8
# warps (16 values a thread) compiles for sm_90 to 64-80 registers without spills (ptxas -v): 3-4
# programs per SM, 24-32 KiB of bf16 loads in flight. 8,192 columns took 128-170 registers,
# one or two programs and 16-32 KiB. The pass reads each row twice and writes it once, ~5%
# of the block's three matmuls at d=4,096 even if every read came from HBM. The interpreter
# pays per block, not per element, so it takes the row in one block.
_GPU_BLOCK, _GPU_WARPS = 4096, 8
_INTERPRETER_MAX_BLOCK = 65536


@triton.jit
def _rows_kernel(z_ptr, stride_z, t_ptr, g_ptr, loss_ptr, lse_ptr, V, softcap, z_loss,
                 target_coef, smooth_coef, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t = tl.load(t_ptr + row)
    # Online log-sum-exp over the row. The first block holds column 0, so m is finite after it
    # and the -inf start only ever meets exp(-inf - m) = 0.
    m = float("-inf")
    s = 0.0
    csum = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        valid = cols < V
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        # mask after the cap: capping a -inf filler would give -softcap, a real-looking logit
        c = tl.where(valid, _capped(z, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(c, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), axis=0)
        m = m_new
        if HAS_SMOOTH:
            csum += tl.sum(tl.where(valid, c, 0.0), axis=0)
    lse = m + tl.log(s)
    c_t = _capped(tl.load(z_row + t).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = lse - target_coef * c_t + z_loss * lse * lse
    if HAS_SMOOTH:
        loss -= smooth_coef * csum
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        g = tl.load(g_ptr + row)
        p_scale = g * (1.0 + 2.0 * z_loss * lse)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            valid = cols < V
            c = _capped(tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32), softcap,
                        HAS_SOFTCAP)
            d = tl.exp(c - lse) * p_scale - smooth_coef * g
            d = tl.where(cols == t, d - target_coef * g, d)
            if HAS_SOFTCAP:
                d = d * (1.0 - (c / softcap) * (c / softcap))
            tl.store(z_row + cols, d.to(z_ptr.dtype.element_ty), mask=valid)


def _launch_shape(z: torch.Tensor) -> tuple[int, int]:
    if z.device.type != "cuda":
        return min(_INTERPRETER_MAX_BLOCK, triton.next_power_of_2(z.shape[1])), 1
    return _gpu_launch_shape(z)


def _gpu_launch_shape(z: torch.Tensor) -> tuple[int, int]:
    return min(_GPU_BLOCK, triton.next_power_of_2(z.shape[1])), _GPU_WARPS


def cross_entropy_rows(z: torch.Tensor, targets: torch.Tensor, g: torch.Tensor | None,
                       z_loss: float = 0.0, label_smoothing: float = 0.0,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse), both fp32 [n], of the logits z [n, V] (fp32/fp16/bf16) against
    targets [n] (every one in [0, V)).

    With g ([n] fp32, the weight of each row's loss) it also overwrites z with
    d(sum_i g_i loss_i) / dz, in z's dtype; the caller owns z as scratch."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"z must be [n, V] with unit column stride; got shape {tuple(z.shape)}"
                         f" strides {z.stride()}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"z must be fp32/fp16/bf16; got {z.dtype}")
    n, V = z.shape
    if targets.shape != (n,) or (g is not None and g.shape != (n,)):
        raise ValueError(f"targets and g must be [{n}]; got {tuple(targets.shape)} and "
                         f"{None if g is None else tuple(g.shape)}")
    loss = torch.empty(n, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if n == 0:
        return loss, lse
    write_grad = g is not None
    targets = targets.contiguous()
    g = g.float().contiguous() if write_grad else loss  # a placeholder pointer, never read
    block, warps = _launch_shape(z)
    _rows_kernel[(n,)](
        z, z.stride(0), targets, g, loss, lse, V, float(softcap or 1.0), float(z_loss),
        1.0 - label_smoothing, label_smoothing / V, HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTH=label_smoothing != 0, WRITE_GRAD=write_grad, BLOCK=block,
        num_warps=warps)
    return loss, lse
