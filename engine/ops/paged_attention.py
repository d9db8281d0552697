"""Decode attention over a paged KV cache, and the scatter that fills the cache.

Layouts:
  k_cache, v_cache  [num_blocks, block_size, H_kv, d]   (one pool per layer)
  write_kv          k, v [N, H_kv, d] land at slot_mapping[N] (int64: block * block_size +
                    offset; a negative slot is padding and writes nothing)
  paged_decode_attention
                    q [B, H, d] (one new token per sequence) attends to the first seq_lens[b]
                    cached tokens of sequence b, found through block_tables [B, max_blocks]
                    (int32; entries past the sequence's last block are never read);
                    H a multiple of H_kv (grouped-query). Returns [B, H, d] in q's dtype; a
                    sequence of length 0 gives zeros.
The references gather each sequence's blocks into a contiguous [B, H_kv, L, d] tensor and
call SDPA with a length mask: obviously right and memory-hungry. The backends (cuda, triton,
cpp) read the blocks in place; see kernels/paged_attention.py and csrc/*/paged_attention.*.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.ops.dispatch import Op

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_decode(q, k_cache, v_cache, block_tables, seq_lens):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention expects q [B, H, d] and caches [num_blocks, block, "
                         f"H_kv, d]; got q{tuple(q.shape)} k{tuple(k_cache.shape)} v{tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q{tuple(q.shape)} does not fit the cache's H_kv={k_cache.shape[2]}, "
                         f"d={k_cache.shape[3]} (H must be a multiple of H_kv)")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"block_tables must be [B, max_blocks] and seq_lens [B] with B={q.shape[0]}")


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
              num_splits: int = 0) -> torch.Tensor:
    """Gather the blocks, then SDPA with a key-length mask. `num_splits` is a CUDA tuning knob."""
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    batch, heads, d = q.shape
    num_blocks, _, kv_heads, _ = k_cache.shape
    # Unused table entries may hold anything (-1 is common); clamp so the gather stays in
    # bounds, the length mask hides what they point at.
    tables = block_tables.long().clamp(0, num_blocks - 1)
    k = k_cache[tables].reshape(batch, -1, kv_heads, d).transpose(1, 2)
    v = v_cache[tables].reshape(batch, -1, kv_heads, d).transpose(1, 2)
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None],
                                         scale=scale)[:, :, 0]
    return torch.where((lens == 0)[:, None, None], torch.zeros_like(out), out)


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k_cache.view(slots, H_kv, d)[slot_mapping] = k (and v), skipping negative slots."""
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise ValueError(f"write_kv expects k, v [N, H_kv, d] matching caches [num_blocks, block, H_kv, d]; "
                         f"got k{tuple(k.shape)} v{tuple(v.shape)} cache{tuple(k_cache.shape)}")
    slots = slot_mapping.long()
    keep = slots >= 0
    if slots.numel() and int(slots.max()) >= k_cache.shape[0] * k_cache.shape[1]:
        raise ValueError(f"write_kv: a slot is past the cache's {k_cache.shape[0] * k_cache.shape[1]} slots")
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots[keep]] = k[keep]
    flat_v[slots[keep]] = v[keep]


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _with_scale(kernel):
    """Adapts a kernel that needs a numeric scale to the op's `scale=None` default."""
    def call(q, k_cache, v_cache, block_tables, seq_lens, scale=None, num_splits=0):
        return kernel(q, k_cache, v_cache, block_tables, seq_lens, default_scale(q, scale), num_splits)
    return call


paged_decode_attention = Op("paged_decode_attention", reference)
write_kv = Op("write_kv", write_kv_reference)


# ---- fast backends ------------------------------------------------------------------------
def _supports(device_ok, what: str, interpreted: bool = False):
    def decode(q, k_cache, v_cache, block_tables, seq_lens, *args, **kwargs) -> str | None:
        if not all(device_ok(t) for t in (q, k_cache, v_cache, block_tables, seq_lens)):
            return f"needs {what} tensors"
        if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            return f"q and caches must share one of {_DTYPES}, got {q.dtype}/{k_cache.dtype}"
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            return "block_tables and seq_lens must be int32"
        if interpreted and not q.is_cuda and q.dtype == torch.bfloat16:
            return "bf16 arithmetic is wrong under the Triton interpreter; use fp32/fp16 on CPU"
        return None

    def scatter(k, v, k_cache, v_cache, slot_mapping) -> str | None:
        if not all(device_ok(t) for t in (k, v, k_cache, v_cache, slot_mapping)):
            return f"needs {what} tensors"
        if k_cache.dtype not in _DTYPES or not k.dtype == v.dtype == k_cache.dtype == v_cache.dtype:
            return "k, v and the caches must share fp32, fp16 or bf16"
        if slot_mapping.dtype != torch.int64:
            return "slot_mapping must be int64"
        return None
    return decode, scatter


def _cuda_head_dims(supports):
    """The CUDA kernel is compiled for head_dim 64/128/256 (Triton serves the others)."""
    def decode(q, *args, **kwargs) -> str | None:
        if q.shape[-1] not in (64, 128, 256):
            return f"head_dim {q.shape[-1]} is not 64, 128 or 256"
        return supports(q, *args, **kwargs)
    return decode


def _register_backends() -> None:
    import os

    from engine import _native

    on_cpu = lambda t: t.device.type == "cpu"  # noqa: E731
    on_cuda = lambda t: t.is_cuda  # noqa: E731
    if not _native.AVAILABLE:
        for op in (paged_decode_attention, write_kv):
            op.mark_unavailable("cpp", str(_native.LOAD_ERROR))
            op.mark_unavailable("cuda", str(_native.LOAD_ERROR))
    elif not hasattr(torch.ops.engine, "paged_decode_attention"):
        for op in (paged_decode_attention, write_kv):
            op.mark_unavailable("cpp", "engine._C has no paged attention ops (stale build?)")
    else:
        _register_fakes()
        native_decode = torch.ops.engine.paged_decode_attention.default
        native_write = torch.ops.engine.write_kv.default
        for kind, ok, what in (("cpp", on_cpu, "CPU"), ("cuda", on_cuda, "CUDA")):
            if kind == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                    "engine::paged_decode_attention", "CUDA"):
                for op in (paged_decode_attention, write_kv):
                    op.mark_unavailable("cuda", "engine._C was built without CUDA")
                continue
            decode_ok, scatter_ok = _supports(ok, what)
            if kind == "cuda":
                decode_ok = _cuda_head_dims(decode_ok)
            paged_decode_attention.register(kind, _with_scale(native_decode), decode_ok)
            write_kv.register(kind, native_write, scatter_ok)

    try:
        from kernels.paged_attention import paged_decode_attention_triton, write_kv_triton
    except ImportError as exc:
        for op in (paged_decode_attention, write_kv):
            op.mark_unavailable("triton", f"kernels.paged_attention does not import: {exc}")
        return
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    decode_ok, scatter_ok = _supports(lambda t: t.is_cuda or interpreted,
                                      "CUDA (or TRITON_INTERPRET=1)", interpreted)
    paged_decode_attention.register("triton", _with_scale(paged_decode_attention_triton), decode_ok)
    write_kv.register("triton", write_kv_triton, scatter_ok)


def _register_fakes() -> None:
    """Shape functions so torch.compile and opcheck can trace the native ops."""
    @torch.library.register_fake("engine::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=0):
        return q.new_empty(q.shape)

    @torch.library.register_fake("engine::write_kv")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None


_register_backends()
