"""Activation checkpointing recomputes each block in backward: the loss and every gradient are
the ones without it, it is off outside training, and the trainer switches it from the config."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import get_preset
from engine.model import Transformer
from tests.ops.attention_cases import VOCAB, packed_batch


def _model(**kw):
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=3, d_model=64, n_heads=2,
                              max_seq_len=64, **kw)
    torch.manual_seed(0)
    return Transformer(cfg, VOCAB)


def _grads(model, checkpointing, autocast=False):
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    ids, positions, cu, targets = packed_batch("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(model(ids, positions=positions, cu_seqlens=cu), targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("autocast", [False, True])
def test_same_loss_and_gradients(position, autocast):
    model = _model(position=position)
    loss, grads = _grads(model, False, autocast)
    loss_c, grads_c = _grads(model, True, autocast)
    assert torch.equal(loss, loss_c)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=0, atol=0, msg=name)


def test_it_actually_recomputes(monkeypatch):
    model = _model()
    calls = []
    forward = type(model.blocks[0]).forward
    monkeypatch.setattr(type(model.blocks[0]), "forward",
                        lambda self, *a, **k: calls.append(self.layer) or forward(self, *a, **k))
    _grads(model, True)
    assert calls == [0, 1, 2, 2, 1, 0]  # forward, then each block again in backward
    calls.clear()
    _grads(model, False)
    assert calls == [0, 1, 2]
    calls.clear()
    model.eval()  # inference never recomputes
    with torch.no_grad():
        model(packed_batch("cpu")[0])
    assert calls == [0, 1, 2]


def test_the_trainer_turns_it_on(tmp_path):
    from engine.trainer import train_model
    from tests.training_cases import VOCAB as vocab
    from tests.training_cases import random_documents as stream
    from tests.training_cases import small_model_config
    mcfg = small_model_config()
    curves = []
    for on in (False, True):
        tcfg = dataclasses.replace(get_preset("tiny").train, steps=4, batch_size=2, log_every=1,
                                   warmup_steps=2, autocast_bf16=False,
                                   activation_checkpointing=on)
        torch.manual_seed(0)
        model = Transformer(mcfg, vocab.size)
        (tmp_path / str(on)).mkdir()
        curves.append([r["loss"] for r in train_model(model, stream, vocab, tcfg, tmp_path / str(on),
                                                      torch.device("cpu"), resume=False,
                                                      progress=False)])
        assert model.activation_checkpointing is on
    assert curves[0] == curves[1]


def test_the_7b_preset_checkpoints():
    assert get_preset("cm3leon-7b").train.activation_checkpointing
    assert not get_preset("tiny").train.activation_checkpointing
