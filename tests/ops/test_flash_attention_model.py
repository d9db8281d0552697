"""Training the tiny model with the Triton attention backend tracks the reference backend.

A shrunken `tiny` preset (head dim 64, as in the full preset) trains a few AdamW steps on
packed rows with uneven documents, once with ENGINE_BACKEND=attention=triton (the
interpreter on CPU) and once with attention=reference, from the same initialisation. The
per-step losses must agree to fp32 round-off amplified by a few optimiser steps. The Triton
run is repeated with each of the forward's ways of reading its tiles (kernels/flash_attention.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from engine.config import get_preset  # noqa: E402
from engine.model import Transformer  # noqa: E402
from engine.ops.attention import attention  # noqa: E402
from kernels import flash_attention as fa  # noqa: E402
from tests.ops.attention_cases import VOCAB, packed_batch  # noqa: E402


def train_losses(backend: str, monkeypatch, steps: int = 4) -> list[float]:
    monkeypatch.setenv("ENGINE_BACKEND", f"attention={backend}")
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=2, d_model=128, n_heads=2,
                              max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, positions, cu, targets = packed_batch("cpu")
    losses = []
    for _ in range(steps):
        loss = model.loss(model(ids, positions=positions, cu_seqlens=cu), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", fa.VARIANTS)   # every way the forward reads its tiles
def test_tiny_model_trains_the_same_with_triton_attention(monkeypatch, variant):
    monkeypatch.setattr(fa, "_INTERPRETER", fa._INTERPRETER._replace(variant=variant))
    calls = []
    triton_backend = attention.backends["triton"]
    real_fn = triton_backend.fn
    monkeypatch.setattr(triton_backend, "fn", lambda *a, **k: calls.append(1) or real_fn(*a, **k))

    got = train_losses("triton", monkeypatch)
    assert len(calls) == 2 * 4, "the Triton backend was not the one that ran"
    want = train_losses("reference", monkeypatch)
    assert len(calls) == 2 * 4
    assert want[-1] < want[0], "the reference run did not learn; the comparison would be vacuous"
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
