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

Backends: `triton` (kernels/span_cross_entropy.py: tiles of logits live only in registers;
on CUDA, or under TRITON_INTERPRET=1 when forced) and `chunked` (plain torch over blocks of
target rows, below: peak memory O(chunk x V); auto's pick on CPU).
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


span_cross_entropy = Op("span_cross_entropy", reference)


# ---- chunked: plain torch over blocks of target rows -------------------------------------
# One block's fp32 logits. 128 MiB (~520 rows at V=64,512) keeps each matmul large and
# d_weight's per-block read-modify-write (V x d fp32) rare, while the peak stays far below the
# plain loss's [N, V] (bench/span_loss.py: ~1/15 of it at N=8,192).
CHUNK_BYTES = 128 * 2**20


def _chunk_logits(h, weight, softcap):
    logits = (h @ weight.t()).float()  # same rounding as the reference: matmul in input dtype
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


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


def _chunk_grads(dz, h, weight, d_hidden, d_weight):
    """d_hidden rows for this chunk (written in place) and d_weight += dz^T h in fp32."""
    if weight.dtype == torch.float32:
        torch.mm(dz, weight, out=d_hidden)
        d_weight.addmm_(dz.t(), h)
    else:  # 16-bit: matmuls in the input dtype like the reference, but sum chunks in fp32
        dz = dz.to(weight.dtype)
        d_hidden.copy_(dz @ weight)
        d_weight.add_(dz.t() @ h)


class _ChunkedSpanCE(torch.autograd.Function):
    """CE over compacted rows, chunk by chunk; no [n, V] tensor is ever saved.

    With a scalar reduction and gradients wanted, the forward pass already has each chunk's
    logits in hand, so it forms the gradients then (3 matmuls, as the plain loss; recomputing
    in backward would cost a 4th) and backward only scales them by the incoming scalar. For
    reduction="none" (per-row incoming gradient), or a second backward through the same
    graph, backward recomputes each chunk's logits instead."""

    @staticmethod
    def forward(ctx, h, weight, targets, reduction, z_loss, label_smoothing, softcap, eager):
        n, V = h.shape[0], weight.shape[0]
        step = max(16, CHUNK_BYTES // (4 * V))
        losses = h.new_empty(n, dtype=torch.float32)
        lses = torch.empty_like(losses)
        grads = None
        if eager:
            grads = (torch.empty_like(h),
                     torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            g = h.new_full((step,), 1.0 / max(n, 1) if reduction == "mean" else 1.0,
                           dtype=torch.float32)
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = _chunk_logits(h[s:e], weight, softcap)
            cap_grad = _cap_grad(logits, softcap) if eager else None
            losses[s:e], lses[s:e], exps, norm = _chunk_loss(logits, targets[s:e], z_loss,
                                                             label_smoothing)
            if eager:
                dz = _chunk_dlogits(exps, norm, targets[s:e], lses[s:e], g[:e - s], z_loss,
                                    label_smoothing, cap_grad)
                _chunk_grads(dz, h[s:e], weight, grads[0][s:e], grads[1])
        ctx.save_for_backward(h, weight, targets, lses)
        ctx.options = (reduction, z_loss, label_smoothing, softcap, step)
        ctx.grads = grads
        if reduction == "mean":
            return losses.sum() / max(n, 1)
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lses = ctx.saved_tensors
        reduction, z_loss, label_smoothing, softcap, step = ctx.options
        if ctx.grads is not None:
            d_hidden, d_weight = ctx.grads
            ctx.grads = None  # scaled in place below; a second backward recomputes
            return (d_hidden.mul_(grad).to(h.dtype), d_weight.mul_(grad).to(weight.dtype),
                    None, None, None, None, None, None)
        n = h.shape[0]
        if reduction == "none":
            g = grad.float()
        else:
            g = (grad.float() / max(n, 1) if reduction == "mean" else grad.float()).expand(n)
        d_hidden = torch.empty_like(h)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            logits = _chunk_logits(h[s:e], weight, softcap)
            cap_grad = _cap_grad(logits, softcap)
            probs = logits.sub_(lses[s:e, None]).exp_()  # already normalised: norm = 1
            dz = _chunk_dlogits(probs, torch.ones_like(g[s:e]), targets[s:e], lses[s:e],
                                g[s:e], z_loss, label_smoothing, cap_grad)
            _chunk_grads(dz, h[s:e], weight, d_hidden[s:e], d_weight)
        return d_hidden, d_weight.to(weight.dtype), None, None, None, None, None, None


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
            label_smoothing: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """The reference's result with peak memory O(chunk x V) instead of O(n x V)."""
    check_args(hidden, weight, targets, reduction)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    h = hidden.index_select(0, rows)
    eager = (reduction != "none" and torch.is_grad_enabled()
             and (hidden.requires_grad or weight.requires_grad))
    loss = _ChunkedSpanCE.apply(h, weight, targets.index_select(0, rows), reduction,
                                float(z_loss), float(label_smoothing), softcap, eager)
    if reduction != "none":
        return loss
    return loss.new_zeros(hidden.shape[0]).index_put((rows,), loss)


def _same_dtype(hidden, weight, *_args, **_kwargs) -> str | None:
    if hidden.dtype != weight.dtype:
        return f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}"
    return None


span_cross_entropy.register("chunked", chunked, _same_dtype)


def _triton_supports(hidden, weight, *_args, **_kwargs) -> str | None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if hidden.device.type != "cuda" and not interpreted:
        return f"needs CUDA tensors (or TRITON_INTERPRET=1); got {hidden.device.type}"
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {hidden.dtype} is not fp32/fp16/bf16"
    if hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16:
        return "the Triton interpreter computes bf16 dots wrongly; use fp32/fp16 on CPU"
    return _same_dtype(hidden, weight)


try:
    from kernels import span_cross_entropy as _triton_kernel
except ImportError as exc:  # triton is not installed
    span_cross_entropy.mark_unavailable("triton", f"cannot import kernels.span_cross_entropy: {exc}")
else:
    span_cross_entropy.register("triton", _triton_kernel.span_cross_entropy, _triton_supports)
