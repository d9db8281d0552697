"""The span loss inside training: the `tiny` model trained through each backend follows the
reference's loss curve (same init, same fixed batches, AdamW)."""
from __future__ import annotations

import pytest
import torch

from engine.config import get_preset
from engine.model import Transformer
from engine.ops import span_cross_entropy

BATCH, SEQ = 2, 32
LR = 1e-3   # low enough that the curve is smooth: a spiky one amplifies rounding noise


def batches(vocab: int, steps: int):
    """Two fixed random batches, cycled: memorising them makes the loss fall quickly, so the
    curves compared below move (random fresh tokens would keep it flat at log V)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        # a target only on some positions (a span-style mask), so compaction is exercised
        targets = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        targets[torch.rand(BATCH, SEQ, generator=g) < 0.6] = -100
        out.append((ids, targets))
    return [out[i % 2] for i in range(steps)]


def train_curve(backend: str, steps: int, monkeypatch) -> list[float]:
    monkeypatch.setenv("ENGINE_BACKEND", f"span_cross_entropy={backend}")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.vocab.size)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    probe = (torch.zeros(2, cfg.model.d_model), model.lm_head.weight, torch.zeros(2, dtype=torch.long))
    assert span_cross_entropy.select(*probe).name == backend
    losses = []
    for ids, targets in batches(cfg.vocab.size, steps):
        loss = model.loss(model(ids), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~1 min on a loaded 2-core machine: 100 optimizer steps of the tiny model
def test_chunked_follows_reference(monkeypatch):
    ref = train_curve("reference", 50, monkeypatch)
    got = train_curve("chunked", 50, monkeypatch)
    assert ref[-1] < ref[0] - 1.0, "the model did not learn; the comparison would be void"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-3, atol=2e-3)


def test_triton_interpreter_follows_reference(monkeypatch):
    if "triton" not in span_cross_entropy.backends:
        pytest.skip("the triton backend did not load")
    if torch.cuda.is_available():
        pytest.skip("the model runs on CPU here; the GPU kernel has its own cuda tests")
    ref = train_curve("reference", 5, monkeypatch)
    got = train_curve("triton", 5, monkeypatch)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-3, atol=2e-3)
