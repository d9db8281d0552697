"""The C++ attention backend (csrc/cpu/attention*.cpp) against the SDPA reference.

fp32: output and the three gradients must match the reference to fp32 round-off.
bf16: inputs are drawn in bf16; the oracle is the reference in fp32 on the same (upcast)
values and "PyTorch's error" is the reference run in bf16. The kernel's max abs error
against the oracle must be at most 2x PyTorch's for the output and 3x for the gradients,
plus a floor of 1e-3 (a fraction of a bf16 ulp at unit scale: for length-1 rows PyTorch's
error is 0 while the kernel still rounds once). A wrong mask, scale or softmax is off by
O(0.1) in either dtype.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.ops.attention import attention, reference
from engine.ops.dispatch import BackendError
from tests.conftest import needs_native
from tests.ops.attention_cases import VOCAB, forward_backward, packed_batch

pytestmark = needs_native

FP32_TOL = 2e-5
BF16_FLOOR = 1e-3


def make_qkv(b, hq, hkv, s, d, dtype, layout="contiguous"):
    def randn(*shape):
        # Cast before any view is taken: .to() of a non-dense view returns a contiguous copy.
        return torch.randn(*shape).to(dtype)

    if layout == "contiguous":
        q = randn(b, hq, s, d)
        k, v = randn(b, hkv, s, d), randn(b, hkv, s, d)
    elif layout == "bshd":  # the model's layout: views of one [B, S, H, d] projection
        qkv = randn(b, s, hq + 2 * hkv, d)
        q = qkv[:, :, :hq].transpose(1, 2)
        k, v = qkv[:, :, hq:hq + hkv].transpose(1, 2), qkv[:, :, hq + hkv:].transpose(1, 2)
    else:  # "strided_d": every other element of the head dim
        q = randn(b, hq, s, 2 * d)[..., ::2]
        k, v = randn(b, hkv, s, 2 * d)[..., 1::2], randn(b, hkv, s, 2 * d)[..., ::2]
    return [x.requires_grad_() for x in (q, k, v)]


def cpp(q, k, v, **kw):
    return attention(q, k, v, backend="cpp", **kw)


def check(b, hq, hkv, s, d, causal, dtype, cu_seqlens=None, layout="contiguous"):
    q, k, v = make_qkv(b, hq, hkv, s, d, dtype, layout)
    grad_out = torch.randn(b, hq, s, d).to(dtype)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens)
    got = forward_backward(cpp, q, k, v, grad_out, **kw)
    oracle = forward_backward(reference, q, k, v, grad_out, upcast=True, **kw)
    names = ("out", "dq", "dk", "dv")
    for name, g, want in zip(names, got, oracle):
        assert g.dtype == dtype and g.shape == want.shape, name
    if dtype == torch.float32:
        for name, g, want in zip(names, got, oracle):
            torch.testing.assert_close(g, want, atol=FP32_TOL, rtol=FP32_TOL, msg=name)
        return
    theirs = forward_backward(reference, q, k, v, grad_out, **kw)
    for name, mult, g, t, want in zip(names, (2, 3, 3, 3), got, theirs, oracle):
        err = (g.float() - want).abs().max().item()
        torch_err = (t.float() - want).abs().max().item()
        assert err <= mult * torch_err + BF16_FLOOR, \
            f"{name}: kernel error {err:.3g} > {mult} x torch {torch_err:.3g} + floor"


def documents(lengths_per_row):
    """cu_seqlens for rows made of the given document lengths (each row sums to S)."""
    lengths = [n for row in lengths_per_row for n in row]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu, sum(lengths_per_row[0])


DTYPES = [torch.float32, torch.bfloat16]
# Uneven documents with length-1 documents at a row start, in the middle and at the end.
ROWS_83 = [[1, 40, 1, 41], [17, 1, 64, 1]]
ROWS_257 = [[100, 1, 1, 155], [1, 30, 200, 26]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("seq", [1, 7, 83, 257])
def test_matches_reference(seq, d, causal, dtype):
    check(1, 2, 2, seq, d, causal, dtype)


@pytest.mark.parametrize("d", [8, 40, 72])
def test_head_dims_not_a_multiple_of_16(d):
    check(1, 2, 1, 37, d, True, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 2)])
def test_grouped_query(hq, hkv, dtype):
    check(2, hq, hkv, 83, 64, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rows", [ROWS_83, ROWS_257], ids=["S83", "S257"])
def test_packed_documents(rows, causal, dtype):
    cu, seq = documents(rows)
    check(2, 4, 2, seq, 64, causal, dtype, cu_seqlens=cu)


def test_packed_single_token_documents():
    cu, seq = documents([[1] * 7, [3, 1, 1, 1, 1]])
    check(2, 2, 2, seq, 32, True, torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_long_document_split_over_tasks(causal, dtype):
    """Documents over 512 tokens are cut into 256-row tasks (dq summed across them)."""
    cu, seq = documents([[700, 1, 99], [3, 797]])
    check(2, 2, 1, seq, 32, causal, dtype, cu_seqlens=cu)


@pytest.mark.parametrize("layout", ["bshd", "strided_d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(layout, dtype):
    cu, seq = documents(ROWS_83)
    check(2, 4, 2, seq, 64, True, dtype, cu_seqlens=cu, layout=layout)


def test_explicit_scale():
    q, k, v = make_qkv(1, 2, 1, 50, 64, torch.float32)
    torch.testing.assert_close(cpp(q, k, v, scale=0.3), reference(q, k, v, scale=0.3),
                               atol=FP32_TOL, rtol=FP32_TOL)


def test_two_threads_match_one():
    """The OpenMP path (per-thread scratch, split documents' dq sums) gives the same result."""
    cu, seq = documents([[600, 1, 99], [80, 80, 80, 460]])
    q, k, v = make_qkv(2, 4, 2, seq, 64, torch.float32)
    grad_out = torch.randn_like(q)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(forward_backward(cpp, q, k, v, grad_out, cu_seqlens=cu))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)


def test_log_sum_exp_and_its_gradient():
    """The op's lse is the natural-log logsumexp of the masked, scaled scores, and a loss
    that uses it back-propagates through it (grad_lse)."""
    cu, seq = documents(ROWS_83)
    q, k, v = make_qkv(2, 2, 1, seq, 32, torch.float32)
    scale = 32 ** -0.5
    out, lse = torch.ops.engine.attention_fwd(q, k, v, True, scale, cu)
    from engine.ops.attention import build_mask
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~build_mask(q, kk, True, cu), float("-inf"))
    want_lse = scores.logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, atol=FP32_TOL, rtol=FP32_TOL)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    want_out = scores.softmax(-1) @ vv
    want = torch.autograd.grad((want_out.sum() + (want_lse * w).sum()), (q, k, v))
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, atol=1e-4, rtol=1e-4)


def test_opcheck():
    cu, seq = documents(ROWS_83)
    q, k, v = make_qkv(2, 4, 2, seq, 32, torch.float32)
    torch.library.opcheck(torch.ops.engine.attention_fwd.default, (q, k, v, True, 32 ** -0.5, cu))
    torch.library.opcheck(torch.ops.engine.attention_fwd.default, (q, k, v, False, 0.2, None))
    q16, k16, v16 = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.engine.attention_fwd.default, (q16, k16, v16, True, 0.2, cu))
    out, lse = torch.ops.engine.attention_fwd(q, k, v, True, 0.2, cu)
    args = (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
            True, 0.2, cu)
    torch.library.opcheck(torch.ops.engine.attention_bwd.default, args)


def test_auto_picks_cpp_on_cpu_and_falls_back_where_unsupported():
    q, k, v = make_qkv(1, 2, 1, 16, 32, torch.bfloat16)
    assert attention.select(q, k, v).name == "cpp"
    assert attention.select(q.float(), k.float(), v.float()).name == "cpp"
    # fp16 and decode (Sq < Sk) are not the cpp backend's: auto uses the reference, forcing errs.
    half = [x.half() for x in (q, k, v)]
    assert attention.select(*half).name == "reference"
    decode = (q[:, :, -1:], k, v)
    assert attention.select(*decode).name == "reference"
    with pytest.raises(BackendError, match="Sq != Sk"):
        attention(*decode, backend="cpp")


def test_rejects_malformed_documents():
    q, k, v = make_qkv(2, 2, 1, 8, 16, torch.float32)
    for bad in ([0, 5, 12, 16], [0, 8, 15], [0, 9, 8, 16]):  # crosses a row, short, decreasing
        with pytest.raises(ValueError):
            cpp(q, k, v, cu_seqlens=torch.tensor(bad, dtype=torch.int32))


def test_autocast_casts_like_the_reference():
    """Under CPU autocast SDPA runs in bf16; the cpp backend casts its inputs the same way."""
    cu, seq = documents(ROWS_83)
    q, k, v = make_qkv(2, 2, 2, seq, 64, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.select(q, k.bfloat16(), v).name == "cpp"
        got = cpp(q, k.bfloat16(), v, cu_seqlens=cu)
        want = reference(q, k.bfloat16(), v, cu_seqlens=cu)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# ---- the model's training step ------------------------------------------------------------


def loss_and_grads(backend, monkeypatch, **model_kw):
    from engine.config import get_preset
    from engine.model import Transformer

    monkeypatch.setenv("ENGINE_BACKEND", f"attention={backend}")
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=2, d_model=128, n_heads=2,
                              max_seq_len=64, **model_kw)
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB)
    ids, positions, cu, targets = packed_batch()
    loss = model.loss(model(ids, positions=positions, cu_seqlens=cu), targets)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_tiny_model_training_step_matches_reference(position, monkeypatch):
    calls = []
    backend = attention.backends["cpp"]
    real_fn = backend.fn
    monkeypatch.setattr(backend, "fn", lambda *a, **k: calls.append(1) or real_fn(*a, **k))
    got_loss, got = loss_and_grads("cpp", monkeypatch, position=position)
    assert len(calls) == 2, "the cpp backend was not the one that ran"
    want_loss, want = loss_and_grads("reference", monkeypatch, position=position)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
