"""kernels/cross_entropy_rows.py against autograd in fp64: per-row loss, lse, and the d_logits
it writes in place. Interpreter on CPU (fp32/fp16); bf16 and the GPU launch shape as `cuda`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import needs_triton

pytestmark = needs_triton

CASES = [  # (V, opts)
    (7, {}),
    (1000, dict(z_loss=1e-3, label_smoothing=0.1)),
    (300, dict(softcap=3.0)),
    # past the interpreter's one-block row (65,536 columns): the online max crosses blocks
    (70_000, dict(softcap=5.0, z_loss=1e-2, label_smoothing=0.2)),
]
# d_logits is rounded once to z's dtype; relative to its largest entry
GRAD_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _oracle(z, t, g, z_loss=0.0, label_smoothing=0.0, softcap=None):
    zz = z.detach().double().requires_grad_()
    c = zz if softcap is None else softcap * torch.tanh(zz / softcap)
    lse = torch.logsumexp(c, -1)
    loss = F.cross_entropy(c, t, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * lse.square()
    (dz,) = torch.autograd.grad((loss * g.double()).sum(), [zz])
    return loss.detach(), lse.detach(), dz


def _run(device, dtype, V, opts, n=13, row_stride_pad=0):
    from kernels.cross_entropy_rows import cross_entropy_rows
    g0 = torch.Generator().manual_seed(V)
    wide = (torch.randn(n, V + row_stride_pad, generator=g0) * 3).to(device, dtype)
    # odd rows peak in their last column: where V spans several blocks, the running max
    # then rises in the last block and the sum so far must be rescaled
    wide[1::2, V - 1] += 12.0
    z = wide[:, :V]  # row stride V + pad when padded
    t = torch.randint(0, V, (n,), generator=g0).to(device)
    g = torch.rand(n, generator=g0).to(device)
    want_loss, want_lse, want_dz = _oracle(z, t, g, **opts)
    untouched, pad = z.clone(), wide[:, V:].clone()
    loss, lse = cross_entropy_rows(z, t, None, **opts)
    assert torch.equal(z, untouched), "without g the logits must stay as they were"
    loss2, lse2 = cross_entropy_rows(z, t, g, **opts)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    for name, got, want in (("loss", loss, want_loss), ("lse", lse, want_lse)):
        torch.testing.assert_close(got.double(), want, atol=5e-6, rtol=5e-6,
                                   msg=lambda m: f"{name}: {m}")
    err = (z.double() - want_dz).abs().max() / want_dz.abs().max()
    assert err < GRAD_TOL[dtype], f"d_logits relative error {err:.2e}"
    assert torch.equal(wide[:, V:], pad), "the kernel wrote past a row's V columns"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-" + ",".join(c[1]))
def test_rows_interpreter(dtype, case):
    if torch.cuda.is_available():
        pytest.skip("runs as the cuda test below on a GPU machine")
    _run("cpu", dtype, *case)


def test_rows_strided_rows():
    if torch.cuda.is_available():
        pytest.skip("runs as the cuda test below on a GPU machine")
    _run("cpu", torch.float32, 300, dict(label_smoothing=0.1), row_stride_pad=7)


def test_rows_reject_bad_input():
    from kernels.cross_entropy_rows import cross_entropy_rows
    with pytest.raises(ValueError, match="unit column stride"):
        cross_entropy_rows(torch.randn(10, 4).t(), torch.zeros(4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        cross_entropy_rows(torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                           None)
    with pytest.raises(ValueError, match=r"\[4\]"):
        cross_entropy_rows(torch.randn(4, 10), torch.zeros(3, dtype=torch.long), None)
    loss, lse = cross_entropy_rows(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), None)
    assert loss.shape == lse.shape == (0,)


CUDA_CASES = ([(torch.bfloat16, case) for case in CASES]
              + [(dtype, CASES[-1]) for dtype in (torch.float16, torch.float32)])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,case", CUDA_CASES,
                         ids=lambda c: str(c).removeprefix("torch.") if isinstance(c, torch.dtype)
                         else f"V{c[0]}-" + ",".join(c[1]))
def test_rows_cuda(dtype, case):
    _run("cuda", dtype, *case, n=37, row_stride_pad=5)
