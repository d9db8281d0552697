"""The CFG-sampling, span-loss (fused and row pass) and paged-decode Triton kernels compile for Hopper (sm_90)
without a GPU.

The interpreter that runs these kernels' CPU tests executes their Python, not Triton's
compiler, so it accepts what the compiler rejects: on the first GPU run, a plain module
global read inside a @triton.jit function failed every cfg_sample Triton test. Here each
kernel's own launcher runs on CPU tensors of the real dtypes, in a subprocess without
TRITON_INTERPRET, and every launch is compiled for sm_90 instead of run: the signature comes
from the launch's arguments as the JIT would specialise them, so a launcher and its kernel
cannot drift apart unseen. The GPU launch tiles are used (not the interpreter's).
(tests/ops/test_flash_attention_compile.py does the same for flash attention, and checks
its shared memory.)
"""
from __future__ import annotations

import pytest
import torch

from tests.ops.hopper_compile import HOPPER_SMEM_BYTES, run_compile_script

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}
compiled = []


class CompileInsteadOfLaunch:
    # Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) compiles for sm_90.
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kw):
            names = self.fn.arg_names
            consts = {n: kw[n] for n in names if n in kw}
            sig, attrs = {}, {}
            for i, (n, a) in enumerate(zip(names, args)):
                if isinstance(a, torch.Tensor):
                    sig[n] = "*" + DTYPES[a.dtype]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(a, bool):
                    sig[n] = "i1"
                elif isinstance(a, int):
                    sig[n] = "i64" if not -2**31 <= a < 2**31 else "i32"
                elif isinstance(a, float):
                    sig[n] = "fp32"
                else:
                    raise TypeError(f"{self.name}: argument {n} is {type(a).__name__}")
            for n in consts:
                sig[n] = "constexpr"
            missing = [n for n in names if n not in sig]
            if missing:
                raise TypeError(f"{self.name}: launch left {missing} unset")
            k = compile(ASTSource(self.fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages))
            compiled.append([self.name, {n: str(v) for n, v in consts.items()},
                             k.metadata.shared])
        return launch


def patch(module, *names):
    for n in names:
        setattr(module, n, CompileInsteadOfLaunch(n, getattr(module, n)))


import kernels.cfg_sample as cs
import kernels.cross_entropy_rows as crr
import kernels.paged_attention as pa
import kernels.span_cross_entropy as sce
patch(cs, "_cfg_sample_kernel")
patch(sce, "_fwd_kernel", "_bwd_kernel")
patch(crr, "_rows_kernel")
patch(pa, "_decode_kernel", "_write_kv_kernel")
sce._blocks = sce._gpu_blocks
crr._launch_shape = crr._gpu_launch_shape

# CFG sampling: unguided and guided (2B rows), contrastive top-K on and off, a small and the
# full vocabulary (the block table's ends), bf16 and fp32 logits.
for vocab, dtype in ((300, torch.float32), (64512, torch.bfloat16)):
    for guided, cd_k in ((False, 0), (True, 0), (True, 8)):
        B = 4
        logits = torch.zeros(2 * B if guided else B, vocab, dtype=dtype)
        f = torch.ones(B)
        cs.cfg_sample_triton(logits, f, f, torch.zeros(B, dtype=torch.int64), f,
                             torch.tensor([[0, vocab]] * B), torch.zeros(1, dtype=torch.int64),
                             guided, 0.1, cd_k)

# Span cross-entropy forward and backward: bf16 at d=4096 and fp32 at d=64, softcap on/off.
for d, dtype in ((4096, torch.bfloat16), (64, torch.float32)):
    for softcap in (None, 30.0):
        n, V = 64, 1000
        h, w = torch.zeros(n, d, dtype=dtype), torch.zeros(V, d, dtype=dtype)
        t = torch.zeros(n, dtype=torch.int64)
        _, lse = sce._forward(h, w, t, -100, "mean", 1e-4, 0.1, softcap)
        sce._backward(torch.ones(()), h, w, t, lse, -100, "mean", 1e-4, 0.1, softcap, 0.0)

# The chunked span loss's row pass: the benchmark's bf16 rows with the gradient (smoothing,
# then softcap), a loss-only fp32 row, an fp16 row shorter than one block.
for V, dtype, opts, grad in ((64512, torch.bfloat16, dict(label_smoothing=0.1), True),
                             (64512, torch.bfloat16, dict(softcap=30.0, z_loss=1e-4), True),
                             (1000, torch.float32, {}, False),
                             (300, torch.float16, dict(softcap=5.0), True)):
    n = 8
    crr.cross_entropy_rows(torch.zeros(n, V, dtype=dtype), torch.zeros(n, dtype=torch.int64),
                           torch.ones(n) if grad else None, **opts)

# Paged decode (one split, and several with the merge) and the KV-cache write: bf16,
# 32 query / 8 KV heads, d=128 (the benchmark's shape) and d=64.
for d in (128, 64):
    B, blocks, block = 4, 64, 16
    q = torch.zeros(B, 32, d, dtype=torch.bfloat16)
    kc, vc = (torch.zeros(blocks, block, 8, d, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.zeros(B, 16, dtype=torch.int32)
    lens = torch.full((B,), 200, dtype=torch.int32)
    for splits in (1, 4):
        pa.paged_decode_attention_triton(q, kc, vc, tables, lens, d ** -0.5, num_splits=splits)
    k = torch.zeros(8, 8, d, dtype=torch.bfloat16)
    pa.write_kv_triton(k, k.clone(), kc, vc, torch.arange(8, dtype=torch.int64))

print(json.dumps(compiled))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests launch the kernels here")
def test_triton_kernels_compile_for_hopper():
    compiled = run_compile_script(SCRIPT, timeout=900)
    kinds = {name for name, _, _ in compiled}
    assert kinds == {"_cfg_sample_kernel", "_fwd_kernel", "_bwd_kernel", "_rows_kernel",
                     "_decode_kernel", "_write_kv_kernel"}, kinds
    assert len(compiled) == 6 + 4 + 4 + 4 + 4 + 2
    for name, consts, smem in compiled:
        assert 0 <= smem <= HOPPER_SMEM_BYTES, (name, consts, smem)
