"""Scaled dot-product attention with causal and packed-document masking.

Layout: q [B, Hq, Sq, d], k and v [B, Hkv, Sk, d] (Hq a multiple of Hkv: grouped-query).
Causal masking aligns the query block with the end of the keys (Sq < Sk is a decode or a
chunked prefill against a cache).

Packed documents: `cu_seqlens` (int32 [n_docs + 1], starts at 0, ends at B * S) marks
document boundaries over the flattened B * S token stream of q (Sq == Sk required); each
token attends only to tokens of its own document. Every row boundary (multiples of S) must
be a document boundary, so documents never cross rows. This is flash-attention's varlen
convention applied to our [B, H, S, d] rows.

Backends: `triton` (kernels/flash_attention.py, CUDA) and `cpp` (csrc/cpu/attention*.cpp:
OpenMP, fp32 or bf16, Sq == Sk only, so training and prefill; decode falls back). `cpp` only
computes the causal triangle inside each document, where the reference masks full rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.dispatch import Op


def _check(q, k, v, causal, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape [B, H, S, d]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"mismatched shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Sq <= Sk (got {q.shape[2]} > {k.shape[2]})")
    if cu_seqlens is not None and q.shape[2] != k.shape[2]:
        raise ValueError("cu_seqlens (packed documents) needs Sq == Sk")


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[B, S] document index of every token, from flattened document boundaries."""
    total = batch * seq
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at B*S={total}")
    positions = torch.arange(total, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:-1].to(torch.int64), positions, right=True)
    ids = ids.view(batch, seq)
    if batch > 1 and bool((ids[1:, 0] == ids[:-1, -1]).any()):
        raise ValueError("a document crosses a row boundary; every multiple of S must be in cu_seqlens")
    return ids


def build_mask(q, k, causal: bool, cu_seqlens) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Sq, Sk] mask (True = attend), or None when nothing is masked."""
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        qi = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        kj = torch.arange(sk, device=q.device)[None, :]
        mask = (kj <= qi)[None, None]
    if cu_seqlens is not None:
        ids = document_ids(cu_seqlens, q.shape[0], sq)
        same = (ids[:, :, None] == ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def reference(q, k, v, causal: bool = True, scale: float | None = None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with an explicit boolean mask: the oracle and the fallback."""
    _check(q, k, v, causal, cu_seqlens)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = build_mask(q, k, causal, cu_seqlens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


attention = Op("attention", reference)


def _triton_supports(q, k, v, causal: bool = True, scale: float | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> str | None:
    return _flash.unsupported(q, k, v)


def _triton(q, k, v, causal: bool = True, scale: float | None = None,
            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    _check(q, k, v, causal, cu_seqlens)
    if cu_seqlens is not None:
        # Same validation (and error messages) as the reference; it costs one host sync,
        # which keeps a malformed batch from silently attending across documents.
        document_ids(cu_seqlens, q.shape[0], q.shape[2])
    return _flash.flash_attention(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens)


try:
    from kernels import flash_attention as _flash
except ImportError as exc:  # triton missing or broken: forcing the backend says why
    attention.mark_unavailable("triton", f"kernels.flash_attention failed to import: {exc}")
else:
    attention.register("triton", _triton, _triton_supports)


# ---- cpp: csrc/cpu/attention*.cpp through engine._C ----------------------------------------
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype CPU autocast gives SDPA's floating inputs (the reference's rule), or None."""
    if t.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _autocast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    eligible = dtype is not None and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


def _cpp_supports(q, k, v, causal: bool = True, scale: float | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> str | None:
    if any(t.device.type != "cpu" for t in (q, k, v)) or (
            cu_seqlens is not None and cu_seqlens.device.type != "cpu"):
        return "needs CPU tensors"
    cast = _autocast_dtype(q)
    dtypes = {_autocast(torch.empty(0, dtype=t.dtype), cast).dtype for t in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(_CPP_DTYPES):
        return f"q, k, v must share one of {_CPP_DTYPES}, got {q.dtype}/{k.dtype}/{v.dtype}"
    if q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]:
        return "Sq != Sk (decode or chunked prefill against a cache) is not supported"
    return None


def _cpp(q, k, v, causal: bool = True, scale: float | None = None,
         cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    cast = _autocast_dtype(q)
    q, k, v = (_autocast(t, cast) for t in (q, k, v))
    _check(q, k, v, causal, cu_seqlens)
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # The native op validates cu_seqlens (ValueError, as the reference) without a host sync.
    out, _ = torch.ops.engine.attention_fwd(q, k, v, causal, scale, cu_seqlens)
    return out


def _register_cpp() -> None:
    from engine import _native

    if not _native.AVAILABLE:
        attention.mark_unavailable("cpp", str(_native.LOAD_ERROR))
        return
    if not hasattr(torch.ops.engine, "attention_fwd"):
        attention.mark_unavailable("cpp", "engine._C has no attention_fwd op (stale build?)")
        return

    # The schemas and CPU kernels come from csrc/attention_bindings.cpp; shapes (for
    # torch.compile and opcheck) and the autograd formula are registered here.
    @torch.library.register_fake("engine::attention_fwd")
    def _(q, k, v, causal, scale, cu_seqlens=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("engine::attention_bwd")
    def _(grad_out, grad_lse, q, k, v, out, lse, causal, scale, cu_seqlens=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, cu_seqlens = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.engine.attention_bwd(grad_out, grad_lse, q, k, v, out, lse,
                                                    ctx.causal, ctx.scale, cu_seqlens)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("engine::attention_fwd", backward, setup_context=setup_context)
    attention.register("cpp", _cpp, _cpp_supports)


_register_cpp()
