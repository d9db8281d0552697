import dataclasses

import pytest
import torch

from engine.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_model_weights,
                               load_optimizer, save_checkpoint)
from engine.config import get_preset
from engine.model import Transformer
from engine.trainer import lr_at, make_optimizer


def small():
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=1, d_model=32, n_heads=2, max_seq_len=16)
    return Transformer(cfg, 100)


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model = small()
    opt = make_optimizer(model, get_preset("tiny").train)
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 7, model, opt, {"note": 1})
    other = small()
    opt2 = make_optimizer(other, get_preset("tiny").train)
    state = load_model_weights(latest_checkpoint(tmp_path), other)
    load_optimizer(latest_checkpoint(tmp_path), opt2, state)
    assert state["step"] == 7 and state["note"] == 1
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_keeps_only_the_newest_and_leaves_no_temporaries(tmp_path):
    model = small()
    opt = make_optimizer(model, get_preset("tiny").train)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_checkpoint_is_named(tmp_path, damage):
    model = small()
    save_checkpoint(tmp_path, 1, model, make_optimizer(model, get_preset("tiny").train), {})
    f = latest_checkpoint(tmp_path) / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(latest_checkpoint(tmp_path), small())


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(tmp_path)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = dataclasses.replace(get_preset("tiny").train, steps=1000, warmup_steps=100, lr=1.0,
                              min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(99, cfg) == pytest.approx(1.0)
    assert lr_at(550, cfg) == pytest.approx(0.55)
    assert lr_at(1000, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
