"""The VQ-VAE stage stops and resumes: stopped on request, or crashed after a periodic save,
then resumed, its training ends with exactly the weights of a run that never stopped."""
from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from engine.config import ImageConfig, get_preset
from engine.data.shapes import ShapesDataset
from engine.run_artifacts import RunDir, build_vqvae
from engine.stop_request import TrainingStopped
from engine.tokenizer import vq_train
from engine.tokenizer.vq_train import train_vqvae

CFG = ImageConfig(image_size=32, downsample=4, channels=8, code_dim=8, train_steps=40,
                  batch_size=8, lr=3e-3)
CODES = 64


@pytest.fixture(autouse=True)
def early_restarts(monkeypatch):
    # dead codes restarted every 5 steps from step 10 on, so a resumed run must also restore
    # the recent latents the restarts sample from and the bookkeeping that picks them
    monkeypatch.setattr(vq_train, "RESTART_EVERY", 5)
    monkeypatch.setattr(vq_train, "DEAD_AFTER", 10)


@pytest.fixture(scope="module")
def data():
    return ShapesDataset("train", 32, 64)


class StopAfter:
    """Stands in for StopRequests: asks to stop (or, with `crash`, fails as a killed process
    would) when the loop polls it after `steps` steps."""

    def __init__(self, steps: int, crash: bool = False):
        self.polls, self.steps, self.crash = 0, steps, crash

    @property
    def reason(self):
        self.polls += 1
        if self.polls == self.steps:
            if self.crash:
                raise RuntimeError("killed")
            return "SIGTERM"
        return None


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _train(data, **kw):
    return train_vqvae(CFG, CODES, data, seed=3, progress=False, **kw)


def test_stopped_then_resumed_equals_uninterrupted(data, tmp_path):
    straight = _train(data)
    state = tmp_path / "vq.pt"
    with pytest.raises(TrainingStopped) as stopped:
        _train(data, state_path=state, stop=StopAfter(17))
    assert stopped.value.step == 17 and stopped.value.stage == "VQ-VAE"
    assert "after VQ-VAE step 17" in str(stopped.value)
    assert state.is_file()
    _assert_same_weights(_train(data, state_path=state), straight)


def test_a_crash_resumes_from_the_last_periodic_save(data, tmp_path):
    straight = _train(data)
    state = tmp_path / "vq.pt"
    with pytest.raises(RuntimeError, match="killed"):
        # saved after every step; the crash comes after step 23, before its save
        _train(data, state_path=state, stop=StopAfter(23, crash=True), save_every_s=0)
    assert torch.load(state, weights_only=True)["step"] == 22
    _assert_same_weights(_train(data, state_path=state), straight)


def test_a_state_from_other_settings_or_a_broken_file_is_refused(data, tmp_path):
    state = tmp_path / "vq.pt"
    with pytest.raises(TrainingStopped):
        _train(data, state_path=state, stop=StopAfter(5))
    with pytest.raises(ValueError, match="other settings"):
        train_vqvae(CFG, CODES, data, seed=4, progress=False, state_path=state)
    with pytest.raises(ValueError, match="other settings"):
        train_vqvae(dataclasses.replace(CFG, lr=1e-3), CODES, data, seed=3, progress=False,
                    state_path=state)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="delete it"):
        _train(data, state_path=state)
    with pytest.raises(ValueError, match="state_path"):
        _train(data, stop=StopAfter(5))


def test_the_run_stage_stops_on_a_signal_and_resume_finishes_it(data, tmp_path, monkeypatch):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, image=CFG, vocab=dataclasses.replace(cfg.vocab, image_codes=CODES))
    straight = build_vqvae(RunDir(tmp_path / "straight"), cfg, data, progress=False)

    lr_at = vq_train._lr_at

    def signal_at_step_9(step, steps, lr):
        if step == 9:  # lands inside step 9: the loop finishes it, saves, then stops
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, steps, lr)
    monkeypatch.setattr(vq_train, "_lr_at", signal_at_step_9)
    run = RunDir(tmp_path / "stopped")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped) as stopped:
        build_vqvae(run, cfg, data, progress=False)
    assert signal.getsignal(signal.SIGINT) is before, "the handler must be put back"
    assert stopped.value.step == 10 and stopped.value.exit_code == 130
    assert run.vqvae_training.is_file() and not run.vqvae.exists()

    monkeypatch.setattr(vq_train, "_lr_at", lr_at)
    resumed = build_vqvae(run, cfg, data, progress=False)
    assert run.vqvae.is_file() and not run.vqvae_training.exists()
    _assert_same_weights(resumed, straight)


def test_a_signal_in_the_last_step_keeps_the_tokenizer_and_stops(data, tmp_path, monkeypatch):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, image=CFG, vocab=dataclasses.replace(cfg.vocab, image_codes=CODES))
    lr_at = vq_train._lr_at

    def signal_in_the_last_step(step, steps, lr):
        if step == steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, steps, lr)
    monkeypatch.setattr(vq_train, "_lr_at", signal_in_the_last_step)
    run = RunDir(tmp_path / "run")
    with pytest.raises(TrainingStopped) as stopped:
        build_vqvae(run, cfg, data, progress=False)
    assert stopped.value.step == CFG.train_steps and stopped.value.signal_name == "SIGTERM"
    assert run.vqvae.is_file() and not run.vqvae_training.exists()
