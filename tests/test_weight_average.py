import dataclasses

import pytest
import torch

from engine.checkpoint import (CheckpointError, latest_checkpoint, load_average, load_model_weights,
                               save_checkpoint)
from engine.config import get_preset
from engine.model import Transformer
from engine.trainer import make_optimizer
from engine.weight_average import WeightAverage


def small(seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=1, d_model=32, n_heads=2,
                              max_seq_len=16, tie_embeddings=True)
    return Transformer(cfg, 100)


def train_steps(model, opt, average, n):
    for _ in range(n):
        model(torch.randint(0, 100, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        average.update()


def test_average_follows_the_closed_form():
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, decay=0.9)
    name, p = next(iter(model.named_parameters()))
    expected = p.detach().clone()
    for n in range(30):
        model(torch.randint(0, 100, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p.detach()
        average.update()
    torch.testing.assert_close(average.shadow[name], expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(average.shadow[name], p.detach())


def test_copy_to_keeps_tied_weights_tied():
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, decay=0.5)
    train_steps(model, opt, average, 3)
    average.copy_to(model)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), average.shadow[name])


def test_checkpoint_keeps_both_weights_and_restores_the_average(tmp_path):
    model = small()
    opt = make_optimizer(model, get_preset("tiny").train)
    average = WeightAverage(model, decay=0.8)
    train_steps(model, opt, average, 5)
    save_checkpoint(tmp_path, 5, model, opt, {}, average=average)
    ckpt = latest_checkpoint(tmp_path)

    raw, averaged = small(1), small(1)
    load_model_weights(ckpt, raw)
    state = load_model_weights(ckpt, averaged, averaged=True)
    for (name, p), q, r in zip(model.named_parameters(), raw.parameters(), averaged.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(average.shadow[name], r)

    resumed = WeightAverage(raw, decay=0.8)
    load_average(ckpt, resumed, state)
    assert resumed.updates == 5
    assert all(torch.equal(resumed.shadow[k], v) for k, v in average.shadow.items())


def test_damaged_or_missing_average_is_named(tmp_path):
    model = small()
    opt = make_optimizer(model, get_preset("tiny").train)
    save_checkpoint(tmp_path / "plain", 1, model, opt, {})
    plain = latest_checkpoint(tmp_path / "plain")
    state = load_model_weights(plain, small(), averaged=True)      # no average: the step's weights
    with pytest.raises(CheckpointError, match="ema_decay=0"):
        load_average(plain, WeightAverage(model, 0.9), state)

    save_checkpoint(tmp_path / "ema", 1, model, opt, {}, average=WeightAverage(model, 0.9))
    f = latest_checkpoint(tmp_path / "ema") / "average.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="average.safetensors"):
        load_model_weights(latest_checkpoint(tmp_path / "ema"), small(), averaged=True)


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(small(), decay=1.0)


def test_training_saves_the_average_and_leaves_the_model_holding_it(tmp_path):
    from engine.trainer import train_model
    from tests.training_cases import VOCAB as vocab
    from tests.training_cases import random_documents as stream
    from tests.training_cases import small_model_config
    mcfg = small_model_config()

    tcfg = dataclasses.replace(get_preset("tiny").train, steps=6, batch_size=2, warmup_steps=2,
                               checkpoint_every=3, ema_decay=0.9, autocast_bf16=False)
    torch.manual_seed(0)
    model = Transformer(mcfg, vocab.size)
    train_model(model, stream, vocab, tcfg, tmp_path, torch.device("cpu"), resume=False, progress=False)
    raw = Transformer(mcfg, vocab.size)
    state = load_model_weights(latest_checkpoint(tmp_path), raw)
    assert state["average"] == {"decay": 0.9, "updates": 6}
    averaged = Transformer(mcfg, vocab.size)
    load_model_weights(latest_checkpoint(tmp_path), averaged, averaged=True)
    for p, q, r in zip(model.parameters(), averaged.parameters(), raw.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(q, r) for q, r in zip(averaged.parameters(), raw.parameters()))

    longer = dataclasses.replace(tcfg, steps=9)
    train_model(Transformer(mcfg, vocab.size), stream, vocab, longer, tmp_path, torch.device("cpu"),
                resume=True, progress=False)
    assert load_model_weights(latest_checkpoint(tmp_path), raw)["average"]["updates"] == 9
