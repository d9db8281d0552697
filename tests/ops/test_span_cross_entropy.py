"""span_cross_entropy: every backend against F.cross_entropy(hidden @ weight.T) in fp64/fp32.

The oracle is written here from scratch (not the op's reference) so the reference is checked
too. Triton runs under the interpreter on CPU (fp32/fp16, small sizes) and in bf16 on a GPU.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from engine.ops import span_cross_entropy
from engine.ops.dispatch import BackendError

IGNORE = -100
needs_triton = pytest.mark.skipif("triton" not in span_cross_entropy.backends,
                                  reason="the triton backend did not load (triton missing)")
# "chunked:triton-rows" is `chunked` with its CUDA row pass (kernels/cross_entropy_rows.py)
# run under the interpreter instead of the torch one
TRITON_ROWS = "chunked:triton-rows"
CPU_BACKENDS = ["reference", "chunked",
                pytest.param(TRITON_ROWS, marks=needs_triton)]
SPAN_CE = importlib.import_module("engine.ops.span_cross_entropy")


def use(backend, monkeypatch):
    """The backend name to pass, after switching chunked's CPU row pass for TRITON_ROWS."""
    if backend != TRITON_ROWS:
        return backend
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine chunked's Triton row pass has its own cuda tests")
    monkeypatch.setattr(SPAN_CE, "CPU_ROW_PASS", "triton")
    return "chunked"


def oracle(hidden, weight, targets, reduction="mean", z_loss=0.0, label_smoothing=0.0,
           softcap=None):
    """Loss and (d_hidden, d_weight) in fp64 from the plain, unfused formula."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = targets != IGNORE
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none",
                           label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.logsumexp(logits, -1).square() * keep
    if reduction == "mean":
        loss = loss.sum() / max(int(keep.sum()), 1)
    elif reduction == "sum":
        loss = loss.sum()
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64,
                              device=loss.device).view(loss.shape)
    dh, dw = torch.autograd.grad((loss * grad_out).sum(), [h, w])
    return loss, dh, dw, grad_out


def make(n, d, V, dtype=torch.float32, ignored=0.5, device="cpu", contiguous=True):
    g = torch.Generator().manual_seed(n * 7 + V)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(V, d, generator=g) / d**0.5
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = IGNORE
    if not contiguous:  # every other column of a wider buffer: row stride 2d, column stride 2
        hidden = torch.randn(n, 2 * d, generator=g)[:, ::2]
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    return hidden, weight, targets.to(device)


def check(backend, hidden, weight, targets, tol, **opts):
    want, want_dh, want_dw, grad_out = oracle(hidden, weight, targets, **opts)
    got = span_cross_entropy(hidden, weight, targets, backend=backend, **opts)
    assert got.dtype == torch.float32 and got.shape == want.shape
    dh, dw = torch.autograd.grad(got, [hidden, weight], grad_out.to(got))
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    for name, a, b in (("loss", got, want), ("d_hidden", dh, want_dh), ("d_weight", dw, want_dw)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


OPTIONS = [
    dict(),
    dict(z_loss=1e-3),
    dict(label_smoothing=0.1),
    dict(softcap=4.0),
    dict(z_loss=1e-2, label_smoothing=0.2, softcap=2.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("V", [7, 1000])
def test_cpu_backends(backend, reduction, opts, V, monkeypatch):
    hidden, weight, targets = make(83, 32, V)
    check(use(backend, monkeypatch), hidden, weight, targets, 2e-5, reduction=reduction, **opts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_vocab_and_chunking(backend, monkeypatch):
    # 64,512 columns with a tiny chunk so the chunked path crosses several blocks.
    backend = use(backend, monkeypatch)
    monkeypatch.setattr(SPAN_CE, "CHUNK_BYTES", 16 * 4 * 64_512)
    hidden, weight, targets = make(61, 16, 64_512, ignored=0.3)
    check(backend, hidden, weight, targets, 2e-5, reduction="mean", label_smoothing=0.1)
    check(backend, hidden, weight, targets, 2e-5, reduction="none", z_loss=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_hidden(backend, monkeypatch):
    hidden, weight, targets = make(40, 24, 300, contiguous=False)
    assert not hidden.is_contiguous()
    check(use(backend, monkeypatch), hidden, weight, targets, 2e-5, reduction="mean", softcap=3.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.97, 1.0])
def test_mostly_or_all_ignored(backend, reduction, ignored, monkeypatch):
    backend = use(backend, monkeypatch)
    hidden, weight, targets = make(50, 16, 100, ignored=ignored)
    if ignored == 1.0:
        assert (targets == IGNORE).all()
        loss = span_cross_entropy(hidden, weight, targets, backend=backend, reduction=reduction,
                                  z_loss=1e-3)
        dh, dw = torch.autograd.grad(loss.sum(), [hidden, weight])
        assert loss.shape == (() if reduction != "none" else (50,))
        assert (loss == 0).all() and (dh == 0).all() and (dw == 0).all()
    else:
        check(backend, hidden, weight, targets, 2e-5, reduction=reduction, z_loss=1e-3)


@pytest.mark.parametrize("backend", ["chunked", pytest.param(TRITON_ROWS, marks=needs_triton)])
def test_chunked_second_backward_recomputes(backend, monkeypatch):
    # The eager-gradient buffers are consumed by the first backward; a retained graph must
    # still give the same gradients the second time.
    hidden, weight, targets = make(30, 16, 50)
    loss = span_cross_entropy(hidden, weight, targets, backend=use(backend, monkeypatch),
                              softcap=3.0)
    first = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, weight])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["chunked", pytest.param(TRITON_ROWS, marks=needs_triton)])
@pytest.mark.parametrize("chunk_rows", [16, 1024])
def test_chunked_half_precision(backend, chunk_rows, monkeypatch):
    # fp16 logits and d_logits, 16-bit matmuls: one block (d_weight straight from one matmul)
    # and four (d_weight summed in fp32 across blocks) must both stay at fp16's error.
    backend = use(backend, monkeypatch)
    monkeypatch.setattr(SPAN_CE, "CHUNK_BYTES", chunk_rows * 4 * 300)
    hidden, weight, targets = make(130, 32, 300, dtype=torch.float16)
    check(backend, hidden, weight, targets, 3e-3, reduction="mean", z_loss=1e-3)
    check(backend, hidden, weight, targets, 3e-3, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_target_is_an_error(backend, monkeypatch):
    backend = use(backend, monkeypatch)
    hidden, weight, targets = make(10, 8, 20)
    targets[3] = 20
    with pytest.raises(IndexError, match="out of (range|bounds)"):
        span_cross_entropy(hidden, weight, targets, backend=backend)


def test_auto_picks_chunked_on_cpu():
    hidden, weight, targets = make(8, 16, 10)
    assert span_cross_entropy.select(hidden, weight, targets).name == "chunked"


# ---- triton ---------------------------------------------------------------------------------
TRITON_CASES = [  # (n, d, V, opts): odd sizes, every option, each reduction
    (37, 32, 7, dict(reduction="mean")),
    (37, 32, 1000, dict(reduction="sum", z_loss=1e-3, label_smoothing=0.1)),
    (70, 40, 300, dict(reduction="none", softcap=3.0)),
    (21, 16, 64_512, dict(reduction="mean", z_loss=1e-2, softcap=5.0, label_smoothing=0.2)),
]
TRITON_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _ids(case):
    n, d, V, opts = case
    return f"n{n}-d{d}-V{V}-" + ",".join(f"{k}={v}" for k, v in opts.items())


def _triton_case(device, dtype, case):
    n, d, V, opts = case
    hidden, weight, targets = make(n, d, V, dtype=dtype, device=device)
    check("triton", hidden, weight, targets, TRITON_TOL[dtype], **opts)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", TRITON_CASES[:3], ids=_ids)
def test_triton_interpreter(dtype, case):
    if torch.cuda.is_available():
        pytest.skip("runs as the cuda tests below on a GPU machine")
    _triton_case("cpu", dtype, case)


@needs_triton
def test_triton_interpreter_full_vocab_non_contiguous_all_ignored():
    if torch.cuda.is_available():
        pytest.skip("runs as the cuda tests below on a GPU machine")
    _triton_case("cpu", torch.float32, TRITON_CASES[3])
    hidden, weight, targets = make(33, 16, 100, contiguous=False)
    check("triton", hidden, weight, targets, 2e-5, softcap=2.0)
    hidden, weight, targets = make(20, 16, 100, ignored=1.0)
    loss = span_cross_entropy(hidden, weight, targets, backend="triton")
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


@needs_triton
def test_triton_refuses_bf16_under_interpreter():
    if torch.cuda.is_available():
        pytest.skip("bf16 is the GPU case")
    hidden, weight, targets = make(8, 16, 10, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="interpreter"):
        span_cross_entropy(hidden, weight, targets, backend="triton")


@needs_triton
def test_triton_gradient_filter_is_close_and_needs_no_smoothing():
    from kernels.span_cross_entropy import span_cross_entropy as triton_span_ce
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Peaked softmax with every target among the first 256 columns: the vocabulary tiles past
    # them hold only probabilities < 1e-4, so filtering skips them and changes d_weight there.
    weight = torch.randn(5000, 64) / 8
    targets = torch.randint(0, 256, (40,))
    hidden = 20 * weight[targets] / weight[targets].norm(dim=1, keepdim=True) ** 2
    hidden, weight, targets = (hidden.to(device).requires_grad_(),
                               weight.to(device).requires_grad_(), targets.to(device))
    exact = torch.autograd.grad(triton_span_ce(hidden, weight, targets), [hidden, weight])
    approx = torch.autograd.grad(triton_span_ce(hidden, weight, targets, filter_eps=2**-12),
                                 [hidden, weight])
    assert not torch.equal(approx[1], exact[1]), "no tile was filtered; the test is void"
    for a, b in zip(approx, exact):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        triton_span_ce(hidden, weight, targets, label_smoothing=0.1, filter_eps=2**-12)


@needs_triton
def test_triton_opcheck():
    from kernels.span_cross_entropy import span_cross_entropy_bwd, span_cross_entropy_fwd
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = make(19, 16, 40, device=device)
    args = (hidden, weight, targets, IGNORE, "mean", 1e-3, 0.1, 3.0, 0.0)
    torch.library.opcheck(span_cross_entropy_fwd, args)
    loss, lse = span_cross_entropy_fwd(*args)
    torch.library.opcheck(span_cross_entropy_bwd,
                          (torch.ones_like(loss), hidden.detach(), weight.detach(), targets,
                           lse.detach(), IGNORE, "mean", 1e-3, 0.1, 3.0, 0.0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_triton_cuda(dtype, case):
    _triton_case("cuda", dtype, case)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_cuda_large_d_non_contiguous(backend):
    hidden, weight, targets = make(300, 2048, 5000, dtype=torch.bfloat16, device="cuda",
                                   contiguous=False)
    check(backend, hidden, weight, targets, 2e-2, z_loss=1e-4, softcap=30.0)
    assert span_cross_entropy.select(hidden, weight, targets).name == "chunked"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_chunked_cuda(dtype, case, monkeypatch):
    n, d, V, opts = case
    hidden, weight, targets = make(n, d, V, dtype=dtype, device="cuda")
    check("chunked", hidden, weight, targets, TRITON_TOL[dtype], **opts)
    if dtype == torch.bfloat16:  # 16-row blocks: d_weight summed across blocks in fp32
        monkeypatch.setattr(SPAN_CE, "CUDA_CHUNK_BYTES", 16 * V * dtype.itemsize)
        check("chunked", hidden, weight, targets, TRITON_TOL[dtype], **opts)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_cuda_autocast_runs_16_bit_like_the_reference(backend, monkeypatch):
    # fp32 master weights under bf16 autocast, as engine.trainer trains on a GPU: the fast paths
    # cast to bf16 as autocast casts the reference's matmul, and hand back fp32 gradients.
    seen = []
    sweep = SPAN_CE._sweep
    monkeypatch.setattr(SPAN_CE, "_sweep", lambda h, w, *a: seen.append(w.dtype) or sweep(h, w, *a))
    hidden, weight, targets = make(300, 256, 5000, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check(backend, hidden, weight, targets, 2e-2, z_loss=1e-4)
        loss = span_cross_entropy(hidden, weight, targets, backend=backend)
        want = span_cross_entropy(hidden, weight, targets, backend="reference")
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=0)
    if backend == "chunked":
        assert seen and set(seen) == {torch.bfloat16}, seen
