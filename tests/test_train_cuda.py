"""Training on a GPU as engine.train does it: the tiny model, bf16 autocast, fp32 master weights,
packed documents, through engine.trainer.train_model, once with the backends auto picks there
(Triton flash attention, the chunked span loss with its Triton row pass) and once with every
op's reference. The two loss curves must agree to bf16 round-off amplified by the steps, and
the model must learn."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import ops
from engine.config import get_preset
from engine.model import Transformer
from engine.tokenizer.vocab import Vocab
from engine.trainer import train_model

pytestmark = pytest.mark.cuda

STEPS = 30


def _stream(vocab):
    """Six fixed documents of uneven length, cycled: memorising them makes the loss fall, and
    several share each packed row (cu_seqlens)."""
    g = torch.Generator().manual_seed(3)
    docs = [[vocab.bos] + torch.randint(vocab.bpe_start, vocab.size, (n,), generator=g).tolist()
            for n in (40, 90, 17, 120, 63, 75)]

    def factory(seed):
        i = seed
        while True:
            yield docs[i % len(docs)]
            i += 1
    return factory


def _curve(tmp_path, name, monkeypatch, backends):
    monkeypatch.setenv("ENGINE_BACKEND", backends)
    cfg = get_preset("tiny")
    vocab = Vocab.from_config(cfg.vocab)
    tcfg = dataclasses.replace(cfg.train, steps=STEPS, warmup_steps=3, lr=1e-3, log_every=1,
                               checkpoint_every=STEPS, ema_decay=0.0, autocast_bf16=True)
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab.size)
    (tmp_path / name).mkdir()
    records = train_model(model, _stream(vocab), vocab, tcfg, tmp_path / name,
                          torch.device("cuda"), resume=False, progress=False)
    return [r["loss"] for r in records]


def test_tiny_training_on_the_gpu_follows_the_reference(tmp_path, monkeypatch):
    fast = _curve(tmp_path, "fast", monkeypatch, "auto")
    assert ops.attention._last_auto == "triton", ops.attention._last_auto
    assert ops.span_cross_entropy._last_auto == "chunked", ops.span_cross_entropy._last_auto
    ref = _curve(tmp_path, "ref", monkeypatch, "reference")
    assert len(fast) == len(ref) == STEPS
    assert ref[-1] < ref[0] - 1.0, "the model did not learn; the comparison would be void"
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=3e-2, atol=3e-2)
