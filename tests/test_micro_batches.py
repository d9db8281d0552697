"""Micro-batches: a batch's rows split into parts give the whole batch's loss and gradients,
and a part of a packed batch is a packed batch of its own."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import TrainConfig, get_preset
from engine.data.packing import Packer
from engine.model import Transformer
from engine.trainer import _forward_backward, _LossStep, train_model
from tests.training_cases import VOCAB, random_documents, small_model_config


def _docs(seed=0):
    return random_documents(seed, lengths=(3, 39))


def _model():
    torch.manual_seed(0)
    return Transformer(small_model_config(n_layers=2), VOCAB.size)


def test_rows_of_a_batch_are_a_batch():
    batch = Packer(_docs(), VOCAB, 64).next_batch(5)
    model = _model().eval()
    with torch.no_grad():
        whole = model(batch.ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens)
        for a, b in ((0, 2), (2, 5), (4, 5)):
            part = batch.rows(a, b)
            assert part.cu_seqlens[0] == 0 and part.cu_seqlens[-1] == (b - a) * 64
            got = model(part.ids, positions=part.positions, cu_seqlens=part.cu_seqlens)
            torch.testing.assert_close(got, whole[a:b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_give_the_whole_batchs_loss_and_gradients(micro):
    batch = Packer(_docs(1), VOCAB, 64).next_batch(5)
    want_model, got_model = _model(), _model()
    cfg = dataclasses.replace(TrainConfig(), batch_size=5, micro_batch_size=0)
    want = _forward_backward(_LossStep(want_model), batch, cfg, torch.device("cpu"), False, 0)
    got = _forward_backward(_LossStep(got_model), batch,
                            dataclasses.replace(cfg, micro_batch_size=micro),
                            torch.device("cpu"), False, 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(want_model.named_parameters(), got_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_curve_does_not_depend_on_the_micro_batch(tmp_path):
    curves = []
    for micro in (0, 2):
        tcfg = dataclasses.replace(get_preset("tiny").train, steps=4, batch_size=4, log_every=1,
                                   warmup_steps=2, autocast_bf16=False, micro_batch_size=micro)
        (tmp_path / str(micro)).mkdir()
        records = train_model(_model(), _docs, VOCAB, tcfg, tmp_path / str(micro),
                              torch.device("cpu"), resume=False, progress=False)
        curves.append(torch.tensor([r["loss"] for r in records]))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-5, atol=1e-5)


def test_negative_micro_batch_is_refused():
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=-1)


@pytest.mark.parametrize("micro", [0, 2])
def test_a_non_finite_loss_is_an_error(micro):
    batch = Packer(_docs(2), VOCAB, 64).next_batch(4)
    model = _model()
    with torch.no_grad():
        model.blocks[0].fc1.weight[0, 0] = float("nan")
    cfg = dataclasses.replace(TrainConfig(), batch_size=4, micro_batch_size=micro)
    with pytest.raises(FloatingPointError, match="at step 3"):  # raised before optim.step
        _forward_backward(_LossStep(model), batch, cfg, torch.device("cpu"), False, 3)
