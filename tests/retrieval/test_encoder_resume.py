"""The dual encoder's training stops and resumes (engine/retrieval/encoder_training.py): a
stop request ends it after a step with its state saved, and the next call continues from the
state to exactly the weights of a run that never stopped."""
import pytest
import torch
from retrieval_fixtures import CODES, GRID, TEXT_SIZE, small_cfg

from engine.retrieval.encoder_training import train_dual_encoder
from engine.stop_request import TrainingStopped


class StopAt:
    """A StopRequests stand-in whose reason appears once `calls` checks have passed."""
    def __init__(self, calls: int):
        self.left = calls

    @property
    def reason(self):
        self.left -= 1
        return "SIGINT" if self.left < 0 else None


def _train(corpus, cfg, **kw):
    data, _ = corpus
    return train_dual_encoder(data.captions, data.codes, TEXT_SIZE, CODES, GRID, cfg, seed=0,
                              progress=False, **kw)


def test_a_stopped_training_resumes_to_the_same_weights(corpus, tmp_path):
    cfg = small_cfg(encoder_steps=30)
    whole = _train(corpus, cfg).state_dict()
    state = tmp_path / "dual_encoder.training.pt"
    with pytest.raises(TrainingStopped, match="dual encoder step 12") as stopped:
        _train(corpus, cfg, state_path=state, stop=StopAt(11))
    assert stopped.value.exit_code == 130 and state.is_file()
    resumed = _train(corpus, cfg, state_path=state).state_dict()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_periodic_saves_resume_after_a_crash(corpus, tmp_path, monkeypatch):
    """save_every_s=0: a state after every step, so a crash mid-run loses nothing."""
    import engine.retrieval.encoder_training as training
    cfg = small_cfg(encoder_steps=20)
    whole = _train(corpus, cfg).state_dict()
    state = tmp_path / "state.pt"
    real = training.info_nce
    calls = {"n": 0}

    def crash_at_step_15(*args):
        calls["n"] += 1
        if calls["n"] == 15:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(training, "info_nce", crash_at_step_15)
    with pytest.raises(RuntimeError):
        _train(corpus, cfg, state_path=state, save_every_s=0.0)
    monkeypatch.setattr(training, "info_nce", real)
    assert torch.load(state, weights_only=True)["step"] == 14
    resumed = _train(corpus, cfg, state_path=state).state_dict()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_a_state_from_other_settings_is_refused(corpus, tmp_path):
    state = tmp_path / "state.pt"
    with pytest.raises(TrainingStopped):
        _train(corpus, small_cfg(encoder_steps=10), state_path=state, stop=StopAt(3))
    with pytest.raises(ValueError, match="other settings"):
        _train(corpus, small_cfg(encoder_steps=10, encoder_lr=1e-3), state_path=state)
    state.write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a readable"):
        _train(corpus, small_cfg(encoder_steps=10), state_path=state)
