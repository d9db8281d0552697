"""paged_decode_attention and write_kv: every backend against the gather+SDPA reference.

Caches are filled with random values and block tables are random permutations padded with
-1 (entries past a sequence's last block must never be read), so a kernel that reads the
wrong block, the wrong slot or a token past the sequence's end gets the wrong answer.
Low-precision backends are compared with an fp32 oracle on the same (rounded) inputs.
"""
from __future__ import annotations

import pytest
import torch

from engine.ops.paged_attention import paged_decode_attention, reference, write_kv
from tests.conftest import needs_native, needs_triton

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_case(seq_lens, heads, kv_heads, head_dim, block, dtype, device="cpu", spare_blocks=3,
              strided_q=False):
    """Random caches and tables for sequences of the given lengths (blocks shuffled)."""
    need = [-(-n // block) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(max(need), 1) + 1
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, head_dim).to(dtype)
    if strided_q:  # q as the model makes it: a view into a wider projection
        q = torch.randn(len(seq_lens), heads + 2, head_dim).to(dtype)[:, 1:heads + 1]
    else:
        q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, tables, lens)]


def check(backend, seq_lens, heads=4, kv_heads=2, head_dim=64, block=16, dtype=torch.float32,
          device="cpu", **kw):
    q, kc, vc, tables, lens = make_case(seq_lens, heads, kv_heads, head_dim, block, dtype, device,
                                        strided_q=kw.pop("strided_q", False))
    out = paged_decode_attention(q, kc, vc, tables, lens, backend=backend, **kw)
    want = reference(q.float(), kc.float(), vc.float(), tables, lens, kw.get("scale"))
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


SHAPES = [  # (seq_lens, heads, kv_heads, head_dim, block)
    ([1, 7, 83, 200], 4, 4, 64, 16),       # odd lengths, partly filled last blocks, MHA
    ([33, 5, 64], 8, 2, 64, 8),            # GQA 4:1, a length that fills its last block
    ([17, 96, 1], 6, 2, 40, 32),           # GQA 3:1 (not a power of two), odd head_dim
    ([50, 0, 9], 4, 1, 32, 16),            # an empty sequence gives zeros; MQA
]


@needs_native
@pytest.mark.parametrize("seq_lens,heads,kv_heads,head_dim,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_decode(seq_lens, heads, kv_heads, head_dim, block, dtype):
    check("cpp", seq_lens, heads, kv_heads, head_dim, block, dtype)


@needs_native
def test_cpp_decode_long_mixed_batch_strided_q_and_scale():
    check("cpp", [1000, 3, 517, 64, 129], heads=8, kv_heads=2, head_dim=128, block=32,
          strided_q=True, scale=0.3)


@needs_triton
@pytest.mark.parametrize("seq_lens,heads,kv_heads,head_dim,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode(seq_lens, heads, kv_heads, head_dim, block, dtype):
    check("triton", seq_lens, heads, kv_heads, head_dim, block, dtype)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 5])
def test_triton_decode_split_context(num_splits):
    """Flash-decoding: splits past a short sequence's end must carry zero weight."""
    check("triton", [150, 3, 77, 0], heads=4, kv_heads=2, head_dim=32, block=8,
          num_splits=num_splits, strided_q=True)


@pytest.mark.cuda
@pytest.mark.parametrize("seq_lens,heads,kv_heads,head_dim,block", SHAPES + [
    ([4096, 1, 1500, 4000], 32, 8, 128, 16), ([2000, 777], 16, 16, 256, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_decode(backend, seq_lens, heads, kv_heads, head_dim, block, dtype):
    if backend == "cuda" and head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel serves head_dim 64/128/256; others go to triton")
    check(backend, seq_lens, heads, kv_heads, head_dim, block, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_cuda_decode_splits(num_splits):
    check("cuda", [4096, 5, 300, 0], heads=8, kv_heads=2, head_dim=128, block=16,
          dtype=torch.bfloat16, device="cuda", num_splits=num_splits)


# ---- write_kv ---------------------------------------------------------------------------
def _write_case(dtype, device, block=16, tokens=37, kv_heads=2, head_dim=24):
    kc = torch.zeros(6, block, kv_heads, head_dim, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    # k and v as the model produces them: strided views into one projection.
    kv = torch.randn(tokens, 2 * kv_heads + 1, head_dim).to(dtype).to(device)
    k, v = kv[:, :kv_heads], kv[:, kv_heads + 1:]
    slots = torch.randperm(6 * block)[:tokens].to(device)
    slots[::5] = -1                                       # padding: written nowhere
    return k, v, kc, vc, slots


def check_write(backend, dtype=torch.float32, device="cpu", block=16):
    k, v, kc, vc, slots = _write_case(dtype, device, block)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv(k, v, kc, vc, slots, backend=backend)
    write_kv(k, v, kc2, vc2, slots, backend="reference")
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert int((kc != 0).flatten(0, 1).any(-1).any(-1).sum()) == int((slots >= 0).sum())


@needs_native
@pytest.mark.parametrize("block", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_write_kv(block, dtype):
    check_write("cpp", dtype, block=block)


@needs_native
def test_cpp_write_kv_rejects_out_of_range_slot():
    k, v, kc, vc, slots = _write_case(torch.float32, "cpu")
    slots[3] = kc.shape[0] * kc.shape[1]
    with pytest.raises(RuntimeError, match="past the cache"):
        write_kv(k, v, kc, vc, slots, backend="cpp")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_write_kv(dtype):
    check_write("triton", dtype, block=8)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_write_kv(backend):
    check_write(backend, torch.bfloat16, "cuda")


@needs_native
def test_native_ops_pass_opcheck():
    q, kc, vc, tables, lens = make_case([5, 20], 4, 2, 16, 8, torch.float32, spare_blocks=0)
    torch.library.opcheck(torch.ops.engine.paged_decode_attention.default, (q, kc, vc, tables.clamp_min(0), lens, 0.25, 0))
    k, v, kc, vc, slots = _write_case(torch.float32, "cpu")
    torch.library.opcheck(torch.ops.engine.write_kv.default, (k.contiguous(), v.contiguous(), kc, vc, slots.clamp_min(0)))


def test_auto_never_picks_the_interpreter_and_reference_checks_shapes():
    q, kc, vc, tables, lens = make_case([3], 4, 2, 16, 8, torch.float32)
    assert paged_decode_attention.select(q, kc, vc, tables, lens).name != "triton"
    with pytest.raises(ValueError, match="multiple of H_kv"):
        reference(q[:, :3], kc, vc, tables, lens)
