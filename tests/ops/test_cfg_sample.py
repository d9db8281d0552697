"""cfg_sample: every backend against the sort-based reference on exact cases.

Draw statistics live in test_cfg_sample_stats.py. Triton runs under the interpreter on CPU
(slow: small vocabularies and few rows); the `cuda` tests run cuda/triton in bf16 on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from engine.ops.dispatch import BackendError
from engine.ops.sampling import cfg_sample, distribution, normalise
from tests.conftest import needs_native, needs_triton

CPU_BACKENDS = ["reference", pytest.param("cpp", marks=needs_native),
                pytest.param("triton", marks=needs_triton)]
NATIVE = ["reference", pytest.param("cpp", marks=needs_native)]


def _logits(batch, vocab, guided, dtype=torch.float32, device="cpu", seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch if guided else batch, vocab, generator=g) * spread
    return x.to(device=device, dtype=dtype)


def _gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _check_against_distribution(logits, tokens, logprobs, atol=2e-4, **kw):
    """Each token lies in the reference's support and carries its log-probability."""
    logp, _ = distribution(logits.float(), **kw)
    chosen = logp.gather(1, tokens[:, None].cpu()).squeeze(1)
    assert torch.isfinite(chosen).all(), f"drew outside the support: {tokens.tolist()}"
    torch.testing.assert_close(logprobs.cpu(), chosen, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab", [7, 83, 1000])
@pytest.mark.parametrize("cut", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)])
def test_degenerate_cuts_give_the_guided_argmax(backend, vocab, cut):
    logits = _logits(3, vocab, guided=True)
    kw = dict(cfg_scale=torch.tensor([1.5, 3.0, 0.0]), **cut)
    tokens, logprobs = cfg_sample(logits, backend=backend, generator=_gen(), **kw)
    logp, _ = distribution(logits, **kw)
    assert tokens.tolist() == logp.argmax(-1).tolist()
    _check_against_distribution(logits, tokens, logprobs, **kw)


@pytest.mark.parametrize("backend", NATIVE)
def test_full_vocab_rows(backend):
    logits = _logits(2, 64512, guided=True)
    kw = dict(cfg_scale=3.0, temperature=0.9, top_k=torch.tensor([0, 256]), top_p=0.9)
    tokens, logprobs = cfg_sample(logits, backend=backend, generator=_gen(), **kw)
    _check_against_distribution(logits, tokens, logprobs, **kw)
    greedy = cfg_sample(logits, backend=backend, cfg_scale=3.0, temperature=0.0)[0]
    assert greedy.tolist() == distribution(logits, cfg_scale=3.0)[0].argmax(-1).tolist()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_with_different_parameters(backend):
    vocab, batch = 83, 6
    logits = _logits(batch, vocab, guided=True, seed=1)
    kw = dict(cfg_scale=torch.tensor([1.0, 0.0, 2.5, 7.0, 1.5, 3.0]),
              temperature=torch.tensor([1.0, 0.5, 2.0, 0.0, 1.3, 0.8]),
              top_k=torch.tensor([0, 5, 0, 3, 40, 1]),
              top_p=torch.tensor([1.0, 1.0, 0.6, 0.9, 0.3, 0.5]),
              allowed=torch.tensor([[0, 83], [10, 50], [0, 83], [70, 83], [5, 6], [0, 40]]))
    for seed in range(3):
        tokens, logprobs = cfg_sample(logits, backend=backend, generator=_gen(seed), **kw)
        _check_against_distribution(logits, tokens, logprobs, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neg_inf_and_disallowed_ids_are_never_drawn(backend):
    batch, vocab = 8, 83
    logits = torch.zeros(2 * batch, vocab)
    logits[:batch, ::2] = float("-inf")      # cond rules out even ids
    logits[batch:, 1::4] = float("-inf")     # uncond rules out ids 1, 5, 9, ...
    allowed = torch.tensor([3, 60])
    tokens, logprobs = cfg_sample(logits, backend=backend, cfg_scale=2.0, allowed=allowed,
                                  generator=_gen())
    assert ((tokens % 2 == 1) & (tokens % 4 != 1) & (tokens >= 3) & (tokens < 60)).all(), tokens
    _check_against_distribution(logits, tokens, logprobs, cfg_scale=2.0, allowed=allowed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties(backend):
    # Three ids tie for the max: greedy takes the first; top_k=2 keeps all three (ties at
    # the cut are kept), and -0.0 ties with +0.0.
    logits = torch.full((12, 9), -5.0)
    logits[:, [2, 4, 7]] = 1.0
    logits[:, 5] = -0.0
    logits[:, 6] = 0.0
    assert cfg_sample(logits, backend=backend, temperature=0.0)[0].eq(2).all()
    tokens, logprobs = cfg_sample(logits, backend=backend, top_k=2, generator=_gen())
    assert set(tokens.tolist()) == {2, 4, 7}
    torch.testing.assert_close(logprobs, torch.full((12,), -torch.log(torch.tensor(3.0))))
    tokens = cfg_sample(logits, backend=backend, top_k=5, top_p=0.9999, generator=_gen(1))[0]
    assert set(tokens.tolist()) <= {2, 4, 5, 6, 7}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(backend):
    logits = _logits(2, 50, guided=True)
    logits[3, 17] = float("nan")   # in an uncond row, outside the allowed range
    with pytest.raises(ValueError, match="NaN"):
        cfg_sample(logits, backend=backend, cfg_scale=2.0, allowed=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="no allowed token"):
        cfg_sample(torch.full((2, 50), float("-inf")), backend=backend)
    with pytest.raises(ValueError, match="no allowed token"):
        cfg_sample(_logits(2, 50, guided=False), backend=backend, allowed=torch.tensor([7, 7]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cd_k(backend):
    logits = _logits(3, 83, guided=True, seed=2)
    logits[0, :5] = float("-inf")
    for cd in [(0.1, 5), (1.0, 3), (0.5, 500)]:   # k past the finite count keeps all finite
        tokens, logprobs = cfg_sample(logits, backend=backend, cd_k=cd, generator=_gen())
        _check_against_distribution(logits, tokens, logprobs, cd_k=cd)
    tokens = cfg_sample(logits, backend=backend, cd_k=(1.0, 1), generator=_gen())[0]
    assert tokens.tolist() == logits[:3].argmax(-1).tolist()   # alpha=1, k=1: the cond argmax


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_and_strided_inputs(backend):
    base = _logits(2, 200, guided=True, dtype=torch.float16)
    logits = base[:, 50:133]                    # rows strided by 200
    assert not logits.is_contiguous()
    tokens, logprobs = cfg_sample(logits, backend=backend, cfg_scale=2.0, top_p=0.8,
                                  generator=_gen())
    _check_against_distribution(logits, tokens, logprobs, atol=1e-3, cfg_scale=2.0, top_p=0.8)


@needs_native
def test_seed_reproducible_and_row_independent():
    logits = _logits(64, 83, guided=True)
    kw = dict(cfg_scale=2.0, top_p=0.95)
    a = cfg_sample(logits, backend="cpp", generator=_gen(5), **kw)[0]
    b = cfg_sample(logits, backend="cpp", generator=_gen(5), **kw)[0]
    c = cfg_sample(logits, backend="cpp", generator=_gen(6), **kw)[0]
    assert a.equal(b) and not a.equal(c)
    # Row i's draw does not depend on the rows after it.
    rows = torch.cat([logits[:8], logits[64:72]])
    assert cfg_sample(rows, backend="cpp", generator=_gen(5), **kw)[0].equal(a[:8])


@needs_native
@needs_triton
@pytest.mark.parametrize("kw", [dict(), dict(cfg_scale=2.0, top_k=5), dict(top_p=0.7),
                                dict(cfg_scale=3.0, top_k=20, top_p=0.8, temperature=0.7),
                                dict(cd_k=(0.2, 6))])
def test_triton_draws_what_cpp_draws(kw):
    # Both derive each row's uniform from splitmix64(seed, row) and invert the CDF in id
    # order, so a shared seed gives the same tokens (cpp is checked statistically).
    guided = "cfg_scale" in kw or "cd_k" in kw
    logits = _logits(12, 2100 if kw.get("top_p") == 0.7 else 37, guided, seed=3)
    t_cpp, lp_cpp = cfg_sample(logits, backend="cpp", generator=_gen(9), **kw)
    t_tri, lp_tri = cfg_sample(logits, backend="triton", generator=_gen(9), **kw)
    assert t_cpp.tolist() == t_tri.tolist()
    torch.testing.assert_close(lp_tri, lp_cpp, atol=1e-4, rtol=1e-4)


def test_forcing_a_backend_that_refuses_says_why():
    with pytest.raises(BackendError, match="cuda"):
        cfg_sample(_logits(1, 7, False), backend="cuda")
    with pytest.raises(BackendError, match="int64|dtype"):
        cfg_sample(torch.zeros(1, 7, dtype=torch.int64), backend="cpp")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("vocab", [7, 83, 1000, 64512])
def test_gpu_matches_reference_bf16(backend, vocab):
    logits = _logits(4, vocab, guided=True, dtype=torch.bfloat16, device="cuda")
    kw = dict(cfg_scale=torch.tensor([1.0, 3.0, 0.0, 2.0], device="cuda"),
              temperature=torch.tensor([1.0, 0.7, 0.0, 1.2], device="cuda"),
              top_k=torch.tensor([0, 50, 0, 1], device="cuda"),
              top_p=torch.tensor([0.9, 1.0, 0.5, 1.0], device="cuda"))
    for seed in range(4):
        tokens, logprobs = cfg_sample(logits, backend=backend, generator=_gen(seed, "cuda"), **kw)
        _check_against_distribution(logits.cpu(), tokens, logprobs, atol=2e-3,
                                    **{k: v.cpu() for k, v in kw.items()})
    with pytest.raises(ValueError, match="NaN"):
        bad = logits.clone()
        bad[5, 3] = float("nan")
        cfg_sample(bad, backend=backend, cfg_scale=2.0)
    tokens, logprobs = cfg_sample(logits, backend=backend, cd_k=(0.1, 5), generator=_gen(0, "cuda"))
    _check_against_distribution(logits.cpu(), tokens, logprobs, atol=2e-3, cd_k=(0.1, 5))


@pytest.mark.cuda
@needs_native
def test_gpu_kernels_draw_what_cpp_draws():
    # Same seed tensor into every kernel: the GPU kernels must pick the cpp kernel's tokens
    # (up to rare CDF-boundary rounding: __expf and fp32 sums against double sums).
    from kernels.cfg_sample import cfg_sample_triton
    logits = _logits(64, 64512, guided=True, dtype=torch.bfloat16, device="cuda")
    _, _, scale, temp, k, p, allowed = normalise(logits, 3.0, 0.8, 256, 0.9)
    args = [scale, temp, k, p, allowed.contiguous(), torch.tensor([1234], device="cuda")]
    ref = torch.ops.engine.cfg_sample(logits.cpu(), *[a.cpu() for a in args], True, 1.0, 0)
    for fn in (torch.ops.engine.cfg_sample, cfg_sample_triton):
        tokens, logprobs, status = fn(logits, *args, True, 1.0, 0)
        assert not status.any()
        assert (tokens.cpu() == ref[0]).float().mean() >= 0.95
        torch.testing.assert_close(logprobs.cpu(), ref[1], atol=2e-3, rtol=1e-3)
