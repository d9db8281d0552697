"""Ctrl-C / SIGTERM during training: the loop stops at the end of its step with a checkpoint
there, --resume finishes the run, a second signal stops at once, and the CLI says how to go on."""
from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch

from engine import train
from engine.checkpoint import latest_checkpoint, load_model_weights
from engine.config import get_preset
from engine.model import Transformer
from engine.stop_request import StopRequests, TrainingStopped
from engine.trainer import _read_metrics, train_model
from tests.training_cases import VOCAB, random_documents, small_model_config

STEPS = 12


def _setup():
    vocab, mcfg = VOCAB, small_model_config()
    tcfg = dataclasses.replace(get_preset("tiny").train, steps=STEPS, batch_size=2,
                               warmup_steps=2, checkpoint_every=100, log_every=100,
                               ema_decay=0.9, autocast_bf16=False)
    return vocab, mcfg, tcfg


def _stream(vocab, signal_after_docs=None, sig=signal.SIGINT):
    def factory(seed):
        for n, doc in enumerate(random_documents(seed), start=1):
            if n == signal_after_docs:  # lands inside a step, while its batch is being packed
                os.kill(os.getpid(), sig)
            yield doc
    return factory


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_end_with_a_checkpoint_and_resume_finishes(tmp_path, sig):
    vocab, mcfg, tcfg = _setup()
    before = signal.getsignal(sig)
    torch.manual_seed(0)
    with pytest.raises(TrainingStopped) as stopped:
        train_model(Transformer(mcfg, vocab.size), _stream(vocab, 20, sig), vocab, tcfg,
                    tmp_path, torch.device("cpu"), resume=False, progress=False)
    assert signal.getsignal(sig) is before, "the handler must be put back"
    step = stopped.value.step
    assert 0 < step < STEPS and stopped.value.signal_name == sig.name
    assert stopped.value.exit_code == 128 + sig.value
    # neither checkpoint_every nor log_every fell on this step: both were written for the stop
    state = load_model_weights(latest_checkpoint(tmp_path), Transformer(mcfg, vocab.size))
    assert state["step"] == step and state["average"]["updates"] == step
    assert [r["step"] for r in _read_metrics(tmp_path)] == [step]

    records = train_model(Transformer(mcfg, vocab.size), _stream(vocab), vocab, tcfg, tmp_path,
                          torch.device("cpu"), resume=True, progress=False)
    assert [r["step"] for r in records] == [step, STEPS]
    assert load_model_weights(latest_checkpoint(tmp_path),
                              Transformer(mcfg, vocab.size))["step"] == STEPS


def test_a_second_signal_stops_at_once():
    with StopRequests() as stop:
        stop._on_signal(signal.SIGINT, None)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._on_signal(signal.SIGTERM, None)


def test_the_cli_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def stopped(*_args, **_kwargs):
        raise TrainingStopped(7, "SIGINT")
    monkeypatch.setattr("engine.pipeline.run_pipeline", stopped)
    monkeypatch.setattr("engine.host_memory.keep_freed_memory", lambda: None)
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--steps", "10", "--no-eval", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "after step 7" in err and f"--out {out} --resume" in err
