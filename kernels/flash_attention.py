"""Triton flash attention: launchers, block-size table and the `engine::flash_attention` op.

Layout: q [B, Hq, Sq, d], k and v [B, Hkv, Sk, d] (any strides; Hq a multiple of Hkv for
grouped-query attention), causal aligned bottom-right, optional packed documents given by
`cu_seqlens` (int32 [n_docs + 1]) over the flattened B * S token stream (Sq == Sk, every
row boundary a document boundary). Returns the output [B, Hq, Sq, d] in q's dtype and the
natural-log log-sum-exp [B, Hq, Sq] in fp32.

The kernels live in flash_attention_fwd.py and flash_attention_bwd.py. This module is the
part torch sees: both passes are `torch.library.custom_op`s with fake (meta) kernels, and
the forward's autograd formula calls the backward op, so autograd, torch.compile and
`torch.library.opcheck` all see two opaque ops.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.flash_attention_bwd import (flash_bwd_dkdv_kernel, flash_bwd_dq_kernel,
                                         flash_bwd_preprocess_kernel)
from kernels.flash_attention_fwd import LOG2E, flash_fwd_kernel
from kernels.flash_attention_order import head_group, launch_grid

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class Blocks(NamedTuple):
    block_m: int   # query rows per tile
    block_n: int   # key rows per tile
    num_warps: int
    num_stages: int
    # How the forward runs its key loop (the backward always uses "ptr"):
    #  "ptr": pointer arithmetic with masked loads (any strides, any GPU);
    #  "tma": Hopper's tensor-memory accelerator via tensor descriptors (see tma_ready);
    #  "ptr_lazy", "tma_lazy": the accumulator rescaled only when a row maximum jumps.
    # (A TMA loop under Triton's warp specialisation, tried on an H100 with Triton 3.6, ran at
    # half the pointer loop's speed and gave NaNs with three stages; it was dropped.)
    variant: str = "ptr"


VARIANTS = ("ptr", "ptr_lazy", "tma", "tma_lazy")


# Hopper (H100/H200) tiles, keyed on (pass, head-dim bucket, causal): the fastest correct
# candidate of scripts/tune_flash_attention.py on an H100 80GB HBM3 (bf16, seq 4096,
# b*s = 16k tokens, h*d = 2048; bench/results/attention_h100.json has every measurement;
# candidates within ~3% of each other swap places between runs). Swept when the kernels still
# launched head by head (before flash_attention_order.py), so re-sweep before trusting ties.
# What the sweep showed, and why these shapes win:
#  - forward, causal d=128: one warpgroup (4 warps) on 64x64 tiles beat 8 warps on 128-row
#    tiles (0.61-0.62 ms against 0.63-0.66): the 64-row wgmma slice is the native shape, and
#    small tiles waste less work on the diagonal. 4 warps on 128-row tiles spill the fp32
#    accumulator (1.1 ms). Read by TMA through host-made descriptors, the 64x64 tile took
#    0.601 ms against the pointer loop's 0.649 (medians of three alternating rounds, session
#    14): the copy engine takes over the address arithmetic, about 70 of the ~380
#    instructions a thread runs per key block in the pointer loop (sm_90 SASS). With
#    descriptors made in the kernel, TMA had lost to the pointers on causal masks (0.63
#    against 0.58 ms), where programs are short and each wrote and fenced its four first.
#    Without the mask, 64x64 tiles read by TMA win too (1.07 ms against 1.09-1.16 for the
#    pointer tiles; session 14, in-kernel descriptors).
#  - forward, d=64: the accumulator is half the size, so 128-row tiles over 8 warps win.
#  - dK/dV: two fp32 [BLOCK_N, d] accumulators per program; at d=128, 128-key tiles over 8
#    warps against 64-row query tiles; at d=64, 4 warps on 32-row query tiles.
#  - dQ: the mirror image: 128-row query tiles against 64-key tiles over 8 warps.
# tests/ops/test_flash_attention_compile.py compiles every entry for sm_90 and checks the
# shared memory; ENGINE_FLASH_BLOCKS (below) overrides entries with a user's own sweep.
# fp32 inputs halve both tile sides (twice the bytes per element, IEEE-exact dots).
_HOPPER = {
    ("fwd", 64, True): Blocks(128, 64, 8, 3),
    ("fwd", 64, False): Blocks(128, 64, 8, 3),
    ("fwd", 128, True): Blocks(64, 64, 4, 3, "tma"),
    ("fwd", 128, False): Blocks(64, 64, 4, 3, "tma"),
    ("dkdv", 64, True): Blocks(32, 64, 4, 3),
    ("dkdv", 64, False): Blocks(32, 128, 4, 3),
    ("dkdv", 128, True): Blocks(64, 128, 8, 3),
    ("dkdv", 128, False): Blocks(64, 128, 8, 3),
    ("dq", 64, True): Blocks(64, 64, 4, 3),
    ("dq", 64, False): Blocks(128, 64, 8, 3),
    ("dq", 128, True): Blocks(128, 64, 8, 3),
    ("dq", 128, False): Blocks(128, 64, 8, 3),
}
# The interpreter runs each tile op as a numpy call: 32x32 tiles keep the Python overhead per
# tile low while still splitting the test lengths (7, 83, 257) into several partial blocks.
_INTERPRETER = Blocks(32, 32, 1, 1)


def load_block_table(path: str) -> dict[tuple[str, int, bool], Blocks]:
    """A tile table written by scripts/tune_flash_attention.py: a JSON list of
    {"kind", "head_dim", "causal", "blocks": [block_m, block_n, num_warps, num_stages]} and,
    for the forward, an optional "variant" (one of VARIANTS; "ptr" when absent)."""
    with open(path) as f:
        entries = json.load(f)
    table = {}
    for e in entries:
        key = (e["kind"], int(e["head_dim"]), bool(e["causal"]))
        if key not in _HOPPER:
            raise ValueError(f"{path}: unknown tile key {key}; keys are {sorted(_HOPPER)}")
        variant = e.get("variant", "ptr")
        if variant not in VARIANTS or (variant != "ptr" and key[0] != "fwd"):
            raise ValueError(f"{path}: {key}: variant {variant!r} is not one of "
                             f"{VARIANTS} (only the forward has variants other than ptr)")
        table[key] = Blocks(*(int(x) for x in e["blocks"]), variant=variant)
    return table


# ENGINE_FLASH_BLOCKS=path.json replaces entries of the table above with tiles measured on
# the user's own GPU (scripts/tune_flash_attention.py writes such a file). A bad file fails
# loudly at import rather than silently running the defaults.
if os.environ.get("ENGINE_FLASH_BLOCKS"):
    _HOPPER.update(load_block_table(os.environ["ENGINE_FLASH_BLOCKS"]))


def pick_blocks(kind: str, head_dim: int, causal: bool, dtype: torch.dtype) -> Blocks:
    if INTERPRETED:
        return _INTERPRETER
    blocks = _HOPPER[(kind, 64 if head_dim <= 64 else 128, causal)]
    if dtype == torch.float32:
        blocks = blocks._replace(block_m=max(blocks.block_m // 2, 16),
                                 block_n=max(blocks.block_n // 2, 16))
    return blocks


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when these kernels can run the call, else why not."""
    if not (q.device == k.device == v.device):
        return "q, k, v are on different devices"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and INTERPRETED):
        return f"needs CUDA tensors (or CPU with TRITON_INTERPRET=1), got {q.device.type}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"dtypes must match and be fp16/bf16/fp32, got {q.dtype}/{k.dtype}/{v.dtype}"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "the Triton interpreter computes bf16 wrongly; use fp16/fp32 on CPU"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {HEAD_DIMS}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address these [B, H, S, d] tensors: unit last stride,
    16-byte aligned base and other strides (the hardware's rule), on a Hopper-or-newer GPU
    or in the interpreter. Anything else takes the pointer kernel, which reads any layout."""
    for t in tensors:
        if t.device.type == "cuda":
            index = t.device.index if t.device.index is not None else torch.cuda.current_device()
            if _capability(index)[0] < 9:
                return False
        elif not INTERPRETED:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def fwd_variant(blk: Blocks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The variant the forward launches: the table's, unless the tensors rule TMA out (then
    the pointer loop, lazy if the table's was)."""
    if not blk.variant.startswith("tma") or tma_ready(q, k, v):
        return blk.variant
    return "ptr_lazy" if blk.variant.endswith("_lazy") else "ptr"


def _head_tiles(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor of a [B, H, S, d] tensor whose blocks are `rows` rows of one head."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def doc_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token [start, end) of its document, as positions within its row (int32 [B, S])."""
    cu = cu_seqlens.to(device=cu_seqlens.device, dtype=torch.int64)
    pos = torch.arange(batch * seq, device=cu.device)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    row_start = (pos // seq) * seq
    start = (cu[doc] - row_start).to(torch.int32).view(batch, seq)
    end = (cu[doc + 1] - row_start).to(torch.int32).view(batch, seq)
    return start.contiguous(), end.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dots: the TF32 default would lose ~3 decimal digits and make
    # fp32 no more accurate than fp16. For 16-bit inputs the setting does not apply.
    return "ieee" if dtype == torch.float32 else "tf32"


def _varlen_args(cu_seqlens, q):
    if cu_seqlens is None:
        return q, q, False  # placeholders, never read when VARLEN is False
    start, end = doc_bounds(cu_seqlens.to(q.device), q.shape[0], q.shape[2])
    return start, end, True


@torch.library.custom_op("engine::flash_attention", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float, cu_seqlens: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty((batch, heads, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    start, end, varlen = _varlen_args(cu_seqlens, q)
    blk = pick_blocks("fwd", d, causal, q.dtype)
    variant = fwd_variant(blk, q, k, v)
    tma = variant.startswith("tma")
    tensors = (q, k, v, out)
    if tma:
        tensors = (_head_tiles(q, blk.block_m), _head_tiles(k, blk.block_n),
                   _head_tiles(v, blk.block_n), _head_tiles(out, blk.block_m))
    groups = heads // k.shape[1]
    # A program reads its kv head's K and V, shared by `groups` query heads.
    group = head_group(batch * heads, 2 * sk * d * k.element_size() // groups, causal)
    flash_fwd_kernel[launch_grid(triton.cdiv(sq, blk.block_m), batch * heads)](
        *tensors, lse, start, end,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        heads, groups, sq, sk, scale * LOG2E, group,
        HEAD_DIM=d, BLOCK_D=max(triton.next_power_of_2(d), 16),
        BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, CAUSAL=causal, VARLEN=varlen,
        DOT_PRECISION=_dot_precision(q.dtype), TMA=tma, EVEN_K=tma and sk % blk.block_n == 0,
        LAZY_RESCALE=variant.endswith("_lazy"),
        num_warps=blk.num_warps, num_stages=blk.num_stages)
    return out, lse


@flash_attention_fwd.register_fake
def _(q, k, v, causal, scale, cu_seqlens=None):
    out = q.new_empty(q.shape)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("engine::flash_attention_backward", mutates_args=())
def flash_attention_bwd(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        causal: bool, scale: float, cu_seqlens: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, sq, d = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out = out.contiguous()
    lse = lse.contiguous()
    start, end, varlen = _varlen_args(cu_seqlens, q)
    block_d = max(triton.next_power_of_2(d), 16)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, VARLEN=varlen,
                  DOT_PRECISION=_dot_precision(q.dtype))

    delta = torch.empty_like(lse)
    has_dlse = grad_lse is not None
    pre_m = 32 if INTERPRETED else 64
    flash_bwd_preprocess_kernel[(triton.cdiv(sq, pre_m), batch * heads)](
        out, grad_out, grad_lse.contiguous() if has_dlse else lse, delta,
        *out.stride()[:3], *grad_out.stride(), heads, sq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=has_dlse)

    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    groups = heads // kv_heads
    # A dK/dV program reads Q and dO of its kv head's `groups` query heads; a dQ program
    # reads K and V as the forward does.
    group = head_group(batch * kv_heads, 2 * sq * d * q.element_size() * groups, causal)
    blk = pick_blocks("dkdv", d, causal, q.dtype)
    flash_bwd_dkdv_kernel[launch_grid(triton.cdiv(sk, blk.block_n), batch * kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, start, end, *strides,
        *dk.stride()[:3], *dv.stride()[:3], heads, groups, sq, sk, scale, scale * LOG2E, group,
        BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps,
        num_stages=blk.num_stages, **common)

    group = head_group(batch * heads, 2 * sk * d * k.element_size() // groups, causal)
    blk = pick_blocks("dq", d, causal, q.dtype)
    flash_bwd_dq_kernel[launch_grid(triton.cdiv(sq, blk.block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, start, end, *strides,
        *dq.stride()[:3], heads, groups, sq, sk, scale, scale * LOG2E, group,
        BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps,
        num_stages=blk.num_stages, **common)
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, causal, scale, cu_seqlens=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(grad_out, grad_lse, q, k, v, out, lse,
                                     ctx.causal, ctx.scale, cu_seqlens)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                    return_lse: bool = False):
    """Attention output (and, with return_lse, the fp32 log-sum-exp); differentiable."""
    reason = unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = flash_attention_fwd(q, k, v, causal, scale, cu_seqlens)
    return (out, lse) if return_lse else out
