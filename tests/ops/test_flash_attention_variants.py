"""The forward's loop variants other than the plain pointer loop ("ptr_lazy", "tma",
"tma_lazy") against the SDPA reference, and how the launcher chooses between them.

On CPU the interpreter runs the variants' code: loads and stores through host-made tensor
descriptors of whole [B, H, S, d] tensors (rows past a head's end read as zeros, stores
clipped at it), and the lazy rescale on scores that jump mid-row. The `cuda` tests repeat
them in bf16 where a GPU is present; scripts/tune_flash_attention.py times them.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("triton")

from kernels import flash_attention as fa  # noqa: E402
from kernels.flash_attention import Blocks  # noqa: E402
from tests.ops.test_flash_attention import ROWS_83, check, documents, make_qkv  # noqa: E402

VARIANTS = [v for v in fa.VARIANTS if v != "ptr"]   # "ptr": test_flash_attention.py


@pytest.fixture
def interpreter_variant(monkeypatch):
    """Run the interpreter's tiles with the given forward variant."""
    def use(variant):
        monkeypatch.setattr(fa, "_INTERPRETER", fa._INTERPRETER._replace(variant=variant))
    return use


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", [1, 64, 83, 257])   # 64: whole key blocks (EVEN_K)
def test_matches_reference(interpreter_variant, variant, seq, causal, dtype):
    interpreter_variant(variant)
    check(1, 2, 2, seq, seq, 64, causal, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_grouped_query_packed_model_layout(interpreter_variant, variant):
    """GQA, uneven packed documents (length-1 ones included) and the model's [B, S, H, d]
    views: each descriptor is one (batch, head)'s [S, d] matrix at stride H * d."""
    interpreter_variant(variant)
    cu, seq = documents(ROWS_83)
    check(2, 4, 2, seq, seq, 64, True, torch.float16, cu_seqlens=cu, layout="bshd")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sq,sk", [(40, 83), (40, 96), (1, 64)])
def test_causal_bottom_right(interpreter_variant, variant, sq, sk):
    interpreter_variant(variant)
    check(1, 2, 1, sq, sk, 128, True, torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_growing_scores_rescale_mid_row(interpreter_variant, variant, causal):
    """Keys whose scores grow along the sequence, so a row's maximum jumps by far more than
    2^16 from the first key block to later ones. In fp16, P = exp(score - running max)
    overflows to inf unless the running maximum (and the accumulator) follow the jump:
    the lazy variants must rescale there, not only at the first block. Output and log-sum-exp
    against an fp64 softmax of the same fp16 values."""
    interpreter_variant(variant)
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.2, 8.0, 96)[:, None]    # score scale 40x from first key to last
    q, k, v = (torch.randn(1, 2, 96, 64, generator=gen) for _ in range(3))
    q, k, v = q.half(), (k * ramp).half(), v.half()
    out, lse = fa.flash_attention(q, k, v, causal=causal, return_lse=True)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(96, 96, dtype=torch.bool).triu(1), float("-inf"))
    jump = (scores.amax(-1) - scores[..., :32].amax(-1)).max().item()   # 32: the first block
    assert jump > 16 * math.log(2), f"the scores jump by only {jump:.1f}: nothing to test"
    assert torch.allclose(lse.double(), scores.logsumexp(-1), atol=2e-3, rtol=1e-3)
    want = scores.softmax(-1) @ v.double()
    assert torch.allclose(out.double(), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("layout,want", [("contiguous", "tma"), ("bshd", "tma"),
                                         ("strided_d", "ptr")])
def test_unaligned_layouts_take_the_pointer_kernel(layout, want):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, torch.float16, "cpu", layout)
    blk = Blocks(32, 32, 1, 1, "tma")
    assert fa.fwd_variant(blk, q, k, v) == want
    lazy = fa.fwd_variant(blk._replace(variant="tma_lazy"), q, k, v)
    assert lazy == ("tma_lazy" if want == "tma" else "ptr_lazy")   # keeps its rescaling
    for variant in ("ptr", "ptr_lazy"):
        assert fa.fwd_variant(blk._replace(variant=variant), q, k, v) == variant
    # A base that is not 16-byte aligned: one element into the storage.
    shifted = torch.empty(2 * 8 * 64 + 1, dtype=torch.float16)[1:].view(1, 2, 8, 64)
    assert fa.fwd_variant(blk, shifted, k, v) == "ptr"


def test_block_table_reads_variants(tmp_path):
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps([
        {"kind": "fwd", "head_dim": 128, "causal": True, "blocks": [64, 64, 4, 3],
         "variant": "tma_lazy"},
        {"kind": "dq", "head_dim": 64, "causal": False, "blocks": [64, 64, 4, 3]}]))
    table = fa.load_block_table(str(path))
    assert table[("fwd", 128, True)] == Blocks(64, 64, 4, 3, "tma_lazy")
    assert table[("dq", 64, False)].variant == "ptr"


@pytest.mark.parametrize("entry,match", [
    ({"kind": "fwd", "head_dim": 64, "causal": True, "blocks": [64, 64, 4, 3],
      "variant": "tmaa"}, "variant 'tmaa'"),
    ({"kind": "dkdv", "head_dim": 64, "causal": True, "blocks": [64, 64, 4, 3],
      "variant": "ptr_lazy"}, "only the forward"),
])
def test_block_table_rejects_bad_variants(tmp_path, entry, match):
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=match):
        fa.load_block_table(str(path))


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d,seq", [(64, 1000), (128, 257), (128, 1)])
def test_cuda_bf16_matches_reference(monkeypatch, variant, causal, d, seq):
    key = ("fwd", d, causal)
    monkeypatch.setitem(fa._HOPPER, key, fa._HOPPER[key]._replace(variant=variant))
    check(2, 4, 4, seq, seq, d, causal, torch.bfloat16, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_bf16_gqa_packed_model_layout(monkeypatch, variant):
    key = ("fwd", 128, True)
    monkeypatch.setitem(fa._HOPPER, key, fa._HOPPER[key]._replace(variant=variant))
    cu, seq = documents([[100, 1, 1, 155], [1, 30, 200, 26]], device="cuda")
    check(2, 8, 2, seq, seq, 128, True, torch.bfloat16, device="cuda", cu_seqlens=cu, layout="bshd")
