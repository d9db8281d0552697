"""Triton flash attention (kernels/flash_attention.py) against the SDPA reference.

Error budget, flash-attention style: inputs are drawn in the test dtype; the oracle is the
reference run in fp32 on those same (upcast) values; "PyTorch's error" is the reference run
in the test dtype. The kernel's max abs error against the oracle must be at most 2x
PyTorch's for the output and 3x for the gradients, plus an absolute floor FLOOR[dtype]: in
fp32 PyTorch's error against an fp32 oracle is 0 by construction, and for length-1 rows it
is 0 in every dtype (softmax of one score is exactly 1), while the kernel legitimately
differs by summation order; the floors are ~100 fp32 ulps at unit scale and ~1/8 of an
fp16/bf16 ulp, far below any real bug.

On CPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in
fp32 and fp16 (the interpreter's bf16 is wrong); the `cuda` tests repeat them in bf16.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.ops.attention import attention, build_mask, reference  # noqa: E402
from engine.ops.dispatch import BackendError  # noqa: E402
from kernels import flash_attention as fa  # noqa: E402
from tests.ops.attention_cases import forward_backward  # noqa: E402

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
CPU_DTYPES = [torch.float32, torch.float16]


def make_qkv(b, hq, hkv, sq, sk, d, dtype, device, layout="contiguous"):
    def randn(*shape):
        # Drawn in fp32 (the same values for every dtype), cast before any view is taken:
        # .to() of a non-dense view would hand back a contiguous copy.
        return torch.randn(*shape, device=device).to(dtype)

    if layout == "contiguous":
        q = randn(b, hq, sq, d)
        k, v = (randn(b, hkv, sk, d) for _ in range(2))
    elif layout == "bshd":   # the model's layout: [B, S, H, d] views transposed to [B, H, S, d]
        q = randn(b, sq, hq, d).transpose(1, 2)
        kv = randn(b, sk, 2, hkv, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:                    # "strided_d": every other element of the head dim
        q = randn(b, hq, sq, 2 * d)[..., ::2]
        k, v = (randn(b, hkv, sk, 2 * d)[..., 1::2] for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


def check(b, hq, hkv, sq, sk, d, causal, dtype, device="cpu", cu_seqlens=None, layout="contiguous"):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype, device, layout)
    grad_out = torch.randn(b, hq, sq, d, device=device, dtype=dtype)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens)
    oracle = forward_backward(reference, q, k, v, grad_out, upcast=True, **kw)
    torch_lp = forward_backward(reference, q, k, v, grad_out, **kw)
    kernel = forward_backward(lambda *a, **k_: attention(*a, backend="triton", **k_),
                              q, k, v, grad_out, **kw)
    for name, mult, got, theirs, want in zip(("out", "dq", "dk", "dv"), (2, 3, 3, 3),
                                             kernel, torch_lp, oracle):
        assert got.dtype == dtype and got.shape == want.shape, name
        err = (got.float() - want).abs().max().item()
        torch_err = (theirs.float() - want).abs().max().item()
        bound = mult * torch_err + FLOOR[dtype]
        assert err <= bound, f"{name}: kernel error {err:.3g} > {mult} x torch {torch_err:.3g} + floor"


def documents(lengths_per_row, device="cpu"):
    """cu_seqlens for rows made of the given document lengths (each row sums to S)."""
    lengths = [n for row in lengths_per_row for n in row]
    cu = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    return cu, sum(lengths_per_row[0])


# Uneven documents with length-1 documents at a row start, in the middle and at the end.
ROWS_83 = [[1, 40, 1, 41], [17, 1, 64, 1]]
ROWS_257 = [[100, 1, 1, 155], [1, 30, 200, 26]]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq", [1, 7, 83, 257])
def test_matches_reference(seq, d, causal, dtype):
    check(1, 2, 2, seq, seq, d, causal, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_grouped_query(hq, hkv, dtype):
    check(2, hq, hkv, 83, 83, 64, True, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rows", [ROWS_83, ROWS_257], ids=["S83", "S257"])
def test_packed_documents(rows, causal, dtype):
    cu, seq = documents(rows)
    check(2, 2, 1, seq, seq, 64, causal, dtype, cu_seqlens=cu)


def test_packed_single_token_documents():
    cu, seq = documents([[1] * 7, [3, 1, 1, 1, 1]])
    check(2, 2, 2, seq, seq, 32, True, torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("layout", ["bshd", "strided_d"])
def test_non_contiguous(layout):
    cu, seq = documents(ROWS_83)
    check(2, 4, 2, seq, seq, 64, True, torch.float16, cu_seqlens=cu, layout=layout)


@pytest.mark.parametrize("sq,sk", [(1, 257), (7, 83), (40, 83)])
def test_causal_bottom_right(sq, sk):
    check(1, 2, 1, sq, sk, 64, True, torch.float32)


def test_log_sum_exp_and_its_gradient():
    q, k, v = make_qkv(1, 2, 1, 83, 83, 64, torch.float32, "cpu")
    cu, _ = documents([[30, 1, 52]])
    scale = 0.1
    out, lse = fa.flash_attention(q, k, v, causal=True, scale=scale, cu_seqlens=cu, return_lse=True)
    mask = build_mask(q, k, True, cu)
    kk, vv = k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1)
    scores = (q @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    want_lse = scores.logsumexp(-1)
    want_out = scores.softmax(-1) @ vv
    assert torch.allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out, want_out, atol=1e-5, rtol=1e-5)
    # A loss that uses the LSE too: its gradient folds into delta in the backward.
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g_out).sum() + (want_lse * g_lse).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_opcheck(packed):
    q, k, v = make_qkv(2, 2, 1, 19, 19, 32, torch.float32, "cpu")
    cu = documents([[5, 1, 13], [19]])[0] if packed else None
    torch.library.opcheck(fa.flash_attention_fwd, (q, k, v, True, 0.125, cu))
    out, lse = fa.flash_attention_fwd(q, k, v, True, 0.125, cu)
    args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
            out.detach(), lse.detach(), True, 0.125, cu)
    torch.library.opcheck(fa.flash_attention_bwd, args)


def test_supports_explains_refusals():
    q = torch.randn(1, 2, 8, 64)
    assert fa.unsupported(q, q, q) is None
    assert "bf16" in fa.unsupported(*(q.bfloat16(),) * 3)
    assert "head dim 48" in fa.unsupported(*(torch.randn(1, 2, 8, 48),) * 3)
    assert "dtypes" in fa.unsupported(q, q.double(), q)
    with pytest.raises(BackendError, match="head dim 48"):
        attention(*(torch.randn(1, 2, 8, 48),) * 3, backend="triton")


def test_packed_rejects_document_across_rows():
    q = torch.randn(2, 1, 8, 32)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 12, 16], dtype=torch.int32),
                  backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq", [1, 7, 83, 257, 1000])
def test_cuda_bf16_matches_reference(seq, d, causal):
    check(2, 4, 4, seq, seq, d, causal, torch.bfloat16, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_bf16_gqa_packed_non_contiguous(causal):
    cu, seq = documents(ROWS_257, device="cuda")
    check(2, 8, 2, seq, seq, 128, causal, torch.bfloat16, device="cuda", cu_seqlens=cu, layout="bshd")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_other_dtypes(dtype):
    check(2, 4, 2, 1000, 1000, 64, True, dtype, device="cuda")
