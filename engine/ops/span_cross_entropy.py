"""Linear + cross-entropy over only the positions that carry a target.

span_cross_entropy(hidden [N, d], weight [V, d], targets [N]) = CE(hidden @ weight.T, targets)
with rows whose target is `ignore_index` dropped before the matmul (compaction), so the cost
follows the number of target positions (CM3's spans, SFT's outputs), not N.

Options (all computed in fp32):
  softcap          logits <- softcap * tanh(logits / softcap) before the loss
  label_smoothing  as torch.nn.functional.cross_entropy
  z_loss           adds z_loss * logsumexp(logits)^2 per target row (PaLM's auxiliary loss)
Reductions: "mean" over target rows (0.0 when there are none, never NaN), "sum", "none"
(a [N] tensor, zero on ignored rows).

Backends:
  chunked  blocks of target rows (below): the BLAS's matmuls, and between them a row pass
           that is one Triton kernel on CUDA (kernels/cross_entropy_rows.py) and torch on
           CPU; peak memory O(block x V). auto's pick on CUDA and on CPU.
  triton   kernels/span_cross_entropy.py: tiles of logits live only in registers, the least
           memory, but slower on a GPU (see the priority below); on CUDA, or under
           TRITON_INTERPRET=1 when forced.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from engine.ops.dispatch import Op

REDUCTIONS = ("mean", "sum", "none")


def check_args(hidden, weight, targets, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, d] and weight [V, d]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
              label_smoothing: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: compact, materialise the [n_targets, V] logits in fp32, take the CE."""
    check_args(hidden, weight, targets, reduction)
    keep = targets != ignore_index
    rows = keep.nonzero().squeeze(1)
    logits = (hidden.index_select(0, rows) @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = targets.index_select(0, rows)
    loss = F.cross_entropy(logits, picked, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square()
    if reduction == "mean":
        return loss.sum() / max(rows.numel(), 1)
    if reduction == "sum":
        return loss.sum()
    return torch.zeros(hidden.shape[0], dtype=loss.dtype, device=loss.device).index_put((rows,), loss)


# auto tries `chunked` before `triton`: on an H100 (bench/results/other_kernels_h100.json,
# N=8,192, d=4,096, V=64,512 bf16) the fully fused kernel took 3.4x the reference's time.
# By estimate the cost is its backward's atomic adds: every (row tile, vocabulary tile) pair
# adds fp32 tiles into d_hidden and d_weight, ~100 GB of read-modify-writes at that shape.
# `chunked` runs the reference's own cuBLAS matmuls instead. `triton` keeps the least memory.
span_cross_entropy = Op("span_cross_entropy", reference,
                        priority=("cuda", "cpp", "chunked", "triton", "reference"))


# ---- chunked: blocks of target rows -------------------------------------------------------
# Each block: logits = h @ W.T by the BLAS (cuBLAS / MKL), a row pass that turns them into
# per-row losses and, in place, d_logits, then d_hidden = dz @ W and d_weight += dz.T @ h.
# The row pass is one Triton kernel on CUDA (kernels/cross_entropy_rows.py) and torch on CPU.
#
# Block sizes. CPU: 128 MiB of fp32 logits (~520 rows at V=64,512) keeps the peak far below
# the plain loss's [N, V] (bench/span_loss.py: ~1/15 of it at N=8,192). CUDA: 1 GiB of logits
# in the input dtype (~8,300 bf16 rows at V=64,512), so the usual span batch is one or two
# blocks: cuBLAS wants thousands of rows to reach its peak, and every block after the first
# costs d_weight a read-modify-write of V x d in fp32 (a whole block's matmul time if blocks
# were CPU-sized). With a single block d_weight is one matmul, rounded once, as the reference.
CHUNK_BYTES = 128 * 2**20
CUDA_CHUNK_BYTES = 2**30
# "torch" or "triton": the CPU row pass. Tests set "triton" to run the CUDA row kernel under
# TRITON_INTERPRET=1; on CUDA the Triton row pass is the only one.
CPU_ROW_PASS = "torch"


def _chunk_rows(V: int, h: torch.Tensor) -> int:
    if h.device.type == "cuda":
        return max(16, CUDA_CHUNK_BYTES // (h.element_size() * V))
    return max(16, CHUNK_BYTES // (4 * V))


def _cap_grad(logits, softcap):
    """d(softcap * tanh(z / softcap))/dz = 1 - (c / softcap)^2, from the capped logits c."""
    return None if softcap is None else logits.square().mul_(-1.0 / softcap**2).add_(1.0)


def _chunk_loss(logits, targets, z_loss, label_smoothing):
    """Per-row loss and logsumexp (terms in the module docstring).

    Leaves exp(c - max) in `logits`, in place, and returns 1 / its row sums: the gradient
    starts from the softmax, so this saves a [chunk, V] buffer and two passes over it (the
    normalisation is folded into the gradient's row scale)."""
    loss = -(1.0 - label_smoothing) * logits.gather(1, targets[:, None]).squeeze(1)
    if label_smoothing:
        loss -= (label_smoothing / logits.shape[1]) * logits.sum(1)
    top = logits.amax(1, keepdim=True)
    probs = logits.sub_(top).exp_()
    sumexp = probs.sum(1)
    lse = top.squeeze(1) + sumexp.log()
    loss += lse
    if z_loss:
        loss += z_loss * lse.square()
    return loss, lse, probs, sumexp.reciprocal_()


def _chunk_dlogits(exps, norm, targets, lse, g, z_loss, label_smoothing, cap_grad):
    """d(sum_i g_i loss_i)/d(pre-cap logits), written over `exps` (softmax = exps * norm):
    d/dc_j = p_j (1 + 2 z_loss lse) - (1 - eps) [j == t] - eps / V, times cap_grad."""
    d = exps.mul_((norm * (1.0 + 2.0 * z_loss * lse) * g)[:, None])
    d.scatter_add_(1, targets[:, None], (-(1.0 - label_smoothing) * g)[:, None])
    if label_smoothing:
        d.sub_(((label_smoothing / d.shape[1]) * g)[:, None])
    if cap_grad is not None:
        d.mul_(cap_grad)
    return d


def _torch_rows(z, targets, g, z_loss, label_smoothing, softcap):
    """The row pass in torch, with kernels/cross_entropy_rows.py's contract: (loss, lse) per
    row and, when g is given, d_logits (here fp32, in z's storage when z is fp32)."""
    logits = z.float()  # same rounding as the reference: the matmul's output, then fp32
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    cap_grad = _cap_grad(logits, softcap) if g is not None else None
    loss, lse, exps, norm = _chunk_loss(logits, targets, z_loss, label_smoothing)
    if g is None:
        return loss, lse, None
    return loss, lse, _chunk_dlogits(exps, norm, targets, lse, g, z_loss, label_smoothing,
                                     cap_grad)


def _triton_rows(z, targets, g, z_loss, label_smoothing, softcap):
    loss, lse = _rows_kernel.cross_entropy_rows(z, targets, g, z_loss, label_smoothing, softcap)
    return loss, lse, z if g is not None else None


def _row_pass(device: torch.device):
    if device.type == "cuda" or CPU_ROW_PASS == "triton":
        return _triton_rows  # the chunked backend's supports() checked that it loaded
    return _torch_rows


def _sweep(h, weight, targets, g, z_loss, label_smoothing, softcap):
    """Every block of rows: per-row (loss, lse) and, when g (each row's loss weight) is given,
    (d_hidden, d_weight) in the input dtypes."""
    n, V = h.shape[0], weight.shape[0]
    step = _chunk_rows(V, h)
    row_pass = _row_pass(h.device)
    losses = h.new_empty(n, dtype=torch.float32)
    lses = torch.empty_like(losses)
    d_hidden = torch.empty_like(h) if g is not None else None
    d_weight = None
    for s in range(0, n, step):
        e = min(s + step, n)
        losses[s:e], lses[s:e], dz = row_pass(h[s:e] @ weight.t(), targets[s:e],
                                              None if g is None else g[s:e], z_loss,
                                              label_smoothing, softcap)
        if g is None:
            continue
        # 16-bit matmuls like the reference's backward. fp32 ones are written with out= or in
        # place, which CPU autocast leaves in fp32 (as this path always computed them there).
        dz = dz.to(weight.dtype)
        torch.mm(dz, weight, out=d_hidden[s:e])
        if weight.dtype == torch.float32:
            if d_weight is None:
                d_weight = torch.mm(dz.t(), h[s:e], out=torch.empty_like(weight))
            else:
                d_weight.addmm_(dz.t(), h[s:e])
        elif d_weight is None:
            d_weight = dz.t() @ h[s:e]
        else:  # blocks after the first: sum the 16-bit products in fp32
            d_weight = d_weight.float() if d_weight.dtype != torch.float32 else d_weight
            d_weight.add_(dz.t() @ h[s:e])
    if g is not None and d_weight is None:  # no rows
        d_weight = torch.zeros_like(weight)
    grads = None if g is None else (d_hidden, d_weight.to(weight.dtype))
    return losses, lses, grads


class _ChunkedSpanCE(torch.autograd.Function):
    """CE over compacted rows, block by block; no [n, V] tensor is ever saved.

    With a scalar reduction and gradients wanted, the forward pass already has each block's
    logits in hand, so it forms the gradients then (3 matmuls, as the plain loss; recomputing
    in backward would cost a 4th) and backward only scales them by the incoming scalar. For
    reduction="none" (per-row incoming gradient), or a second backward through the same
    graph, backward recomputes each block's logits instead."""

    @staticmethod
    def forward(ctx, h, weight, targets, reduction, z_loss, label_smoothing, softcap, eager):
        n = h.shape[0]
        g = None
        if eager:
            g = h.new_full((n,), 1.0 / max(n, 1) if reduction == "mean" else 1.0,
                           dtype=torch.float32)
        losses, _, grads = _sweep(h, weight, targets, g, z_loss, label_smoothing, softcap)
        ctx.save_for_backward(h, weight, targets)
        ctx.options = (reduction, z_loss, label_smoothing, softcap)
        ctx.grads = grads
        if reduction == "mean":
            return losses.sum() / max(n, 1)
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets = ctx.saved_tensors
        reduction, z_loss, label_smoothing, softcap = ctx.options
        if ctx.grads is not None:
            d_hidden, d_weight = ctx.grads
            ctx.grads = None  # scaled in place below; a second backward recomputes
            return d_hidden.mul_(grad), d_weight.mul_(grad), None, None, None, None, None, None
        n = h.shape[0]
        if reduction == "none":
            g = grad.float()
        else:
            g = (grad.float() / max(n, 1) if reduction == "mean" else grad.float()).expand(n)
        _, _, (d_hidden, d_weight) = _sweep(h, weight, targets, g, z_loss, label_smoothing,
                                            softcap)
        return d_hidden, d_weight, None, None, None, None, None, None


def _check_targets(targets: torch.Tensor, V: int) -> None:
    # F.cross_entropy's own check; the Triton row pass would read out of bounds instead
    if targets.numel() and bool(((targets < 0) | (targets >= V)).any()):
        bad = targets[(targets < 0) | (targets >= V)][0].item()
        raise IndexError(f"target {bad} is out of range for {V} classes "
                         "(and is not ignore_index)")


def cuda_autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    """Under CUDA autocast, fp32 hidden / weight (master weights) cast to the autocast dtype,
    as autocast casts the reference's matmul: a custom Function or op is not cast for it, and
    fp32 matmuls there would run at a fraction of the 16-bit rate. Autograd carries the
    gradients back through the cast. (CPU autocast is left as this path has always run it:
    the logits matmul in bf16, the gradient matmuls in fp32.)"""
    if (hidden.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            and hidden.dtype == weight.dtype == torch.float32):
        dtype = torch.get_autocast_dtype("cuda")
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
            label_smoothing: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """The reference's result with peak memory O(block x V) instead of O(n x V)."""
    check_args(hidden, weight, targets, reduction)
    hidden, weight = cuda_autocast_inputs(hidden, weight)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    h = hidden.index_select(0, rows)
    picked = targets.index_select(0, rows)
    _check_targets(picked, weight.shape[0])
    eager = (reduction != "none" and torch.is_grad_enabled()
             and (hidden.requires_grad or weight.requires_grad))
    loss = _ChunkedSpanCE.apply(h, weight, picked, reduction, float(z_loss),
                                float(label_smoothing), softcap, eager)
    if reduction != "none":
        return loss
    return loss.new_zeros(hidden.shape[0]).index_put((rows,), loss)


def _same_dtype(hidden, weight, *_args, **_kwargs) -> str | None:
    if hidden.dtype != weight.dtype:
        return f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}"
    return None


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what both Triton kernels take


def _chunked_supports(hidden, weight, *args, **kwargs) -> str | None:
    if hidden.device.type == "cuda":
        if _rows_kernel is None:
            return f"its CUDA row pass needs Triton ({_ROWS_IMPORT_ERROR})"
        if hidden.dtype not in TRITON_DTYPES:
            return f"its CUDA row pass takes fp32/fp16/bf16; got {hidden.dtype}"
    return _same_dtype(hidden, weight, *args, **kwargs)


def _triton_supports(hidden, weight, *_args, **_kwargs) -> str | None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if hidden.device.type != "cuda" and not interpreted:
        return f"needs CUDA tensors (or TRITON_INTERPRET=1); got {hidden.device.type}"
    if hidden.dtype not in TRITON_DTYPES:
        return f"dtype {hidden.dtype} is not fp32/fp16/bf16"
    if hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16:
        return "the Triton interpreter computes bf16 dots wrongly; use fp32/fp16 on CPU"
    return _same_dtype(hidden, weight)


span_cross_entropy.register("chunked", chunked, _chunked_supports)

try:
    from kernels import cross_entropy_rows as _rows_kernel
    from kernels import span_cross_entropy as _triton_kernel
except ImportError as exc:  # triton is not installed
    _rows_kernel = None
    _ROWS_IMPORT_ERROR = f"cannot import the kernels: {exc}"
    span_cross_entropy.mark_unavailable("triton", _ROWS_IMPORT_ERROR)
else:
    def _triton(hidden, weight, *args, **kwargs):
        return _triton_kernel.span_cross_entropy(*cuda_autocast_inputs(hidden, weight), *args,
                                                 **kwargs)

    span_cross_entropy.register("triton", _triton, _triton_supports)
