"""The flash-attention kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only the
compiler rejects (non-constexpr globals, dot shapes, loop-carried type changes) and says
nothing about shared memory. Triton can compile to a cubin for a named target with no
driver; that runs in a subprocess because TRITON_INTERPRET=1 (set for this session by
conftest) turns @triton.jit into the interpreter. Where a GPU is present the `cuda` tests
launch the real kernels instead, so this is skipped there.
"""
from __future__ import annotations

import pytest
import torch

from tests.ops.hopper_compile import HOPPER_SMEM_BYTES, run_compile_script

pytest.importorskip("triton")

# What every script below shares: imports and build(), which compiles one kernel for sm_90.
BUILD = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from kernels import flash_attention as fa
from kernels.flash_attention_bwd import (flash_bwd_dkdv_kernel, flash_bwd_dq_kernel,
                                         flash_bwd_preprocess_kernel)
from kernels.flash_attention_fwd import flash_fwd_kernel

FLOATS = {"scale", "scale_log2"}
SIZES = {"H", "GROUPS", "SQ", "SK", "HEAD_GROUP"}
INT_PTRS = {"DOC_START", "DOC_END"}
FP32_PTRS = {"LSE", "DELTA", "DLSE"}

def build(fn, consts, dtype, num_warps, num_stages):
    # What the JIT would specialise at launch: unit last-dim strides become constants and
    # pointers and the other strides are known multiples of 16.
    consts = dict(consts, **{n: 1 for n in fn.arg_names if n in ("sqd", "skd", "svd", "sdod")})
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
        elif consts.get("TMA") and n in ("Q", "K", "V", "O"):
            # The TMA forward takes host-made descriptors with [1, 1, rows, d] blocks.
            rows = consts["BLOCK_N"] if n in ("K", "V") else consts["BLOCK_M"]
            sig[n] = f"tensordesc<{dtype}[1,1,{rows},{consts['BLOCK_D']}]>"
        elif n in FLOATS:
            sig[n] = "fp32"
        elif n.isupper() and n not in SIZES:
            sig[n] = "*i32" if n in INT_PTRS else "*fp32" if n in FP32_PTRS else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            if n.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel

"""

# Compiles every pass at the Hopper tile table's configs and prints their shared memory.
SCRIPT = BUILD + r"""
results = []
kernels = {"fwd": flash_fwd_kernel, "dkdv": flash_bwd_dkdv_kernel, "dq": flash_bwd_dq_kernel}
for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    for d in (64, 128):
        for causal in (True, False):
            varlen = causal   # both mask paths, without doubling the compile count
            if dtype == torch.float32 and (d != 64 or not causal):
                continue
            for kind, fn in kernels.items():
                blk = fa.pick_blocks(kind, d, causal, dtype)
                consts = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_M=blk.block_m, BLOCK_N=blk.block_n,
                              CAUSAL=causal, VARLEN=varlen, DOT_PRECISION=fa._dot_precision(dtype))
                if kind == "fwd":
                    tma = blk.variant.startswith("tma")
                    consts.update(TMA=tma, EVEN_K=tma, LAZY_RESCALE=blk.variant.endswith("_lazy"))
                smem = build(fn, consts, tname, blk.num_warps, blk.num_stages).metadata.shared
                results.append([kind, tname, d, causal, smem])
smem = build(flash_bwd_preprocess_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64,
                                               HAS_DLSE=True), "bf16", 4, 1).metadata.shared
results.append(["preprocess", "bf16", 128, False, smem])
print(json.dumps(results))
"""

# Compiles the forward's non-"ptr" candidates of scripts/tune_flash_attention.py at d=128,
# causal, bf16 (the headline shape), so a GPU session's sweep spends no time on a tile that
# cannot build, and reports what the compiler made of each: TMA copies, cp.async copies, warps.
VARIANTS_SCRIPT = BUILD + r"""
sys.path.insert(0, "scripts")
from tune_flash_attention import CANDIDATES
results = []
for cand in (fa.Blocks(*c) for c in CANDIDATES["fwd"]):
    if cand.variant == "ptr":
        continue
    tma = cand.variant.startswith("tma")
    consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=cand.block_m, BLOCK_N=cand.block_n,
                  CAUSAL=True, VARLEN=False, DOT_PRECISION="tf32", TMA=tma, EVEN_K=tma,
                  LAZY_RESCALE=cand.variant.endswith("_lazy"))
    k = build(flash_fwd_kernel, consts, "bf16", cand.num_warps, cand.num_stages)
    ptx = k.asm["ptx"]
    results.append([list(cand), k.metadata.shared, ptx.count("cp.async.bulk.tensor"),
                    ptx.count("cp.async.cg") + ptx.count("cp.async.ca"), k.metadata.num_warps])
print(json.dumps(results))
"""

@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests launch the kernels here")
def test_kernels_compile_for_hopper():
    results = run_compile_script(SCRIPT, timeout=600, TRITON_DEFAULT_FP_FUSION="1")
    assert len(results) == 16
    for kind, dtype, d, causal, smem in results:
        assert 0 < smem <= HOPPER_SMEM_BYTES, (kind, dtype, d, causal, smem)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests launch the kernels here")
def test_variant_candidates_compile_for_hopper():
    results = run_compile_script(VARIANTS_SCRIPT, timeout=600, TRITON_DEFAULT_FP_FUSION="1")
    assert {tuple(c)[4] for c, *_ in results} == {"ptr_lazy", "tma", "tma_lazy"}
    for (bm, bn, warps, stages, variant), smem, tma_copies, async_copies, built_warps in results:
        cand = (bm, bn, warps, stages, variant)
        assert 0 < smem <= HOPPER_SMEM_BYTES, (cand, smem)
        if variant.startswith("tma"):
            # Every tile arrives by TMA: none falls back to per-thread cp.async copies.
            assert tma_copies > 0 and async_copies == 0, (cand, tma_copies, async_copies)
        else:
            assert tma_copies == 0 and async_copies > 0, (cand, tma_copies, async_copies)
        assert built_warps == warps, (cand, built_warps)
