"""engine.ops.dispatch: auto follows the op's priority order, forcing is loud."""
from __future__ import annotations

import pytest

from engine.ops.dispatch import PRIORITY, BackendError, Op


def _op(priority=PRIORITY):
    op = Op("toy", lambda x: "reference", priority=priority)
    op.register("triton", lambda x: "triton", lambda x: None if x > 0 else "needs x > 0")
    op.register("chunked", lambda x: "chunked")
    return op


def test_auto_follows_the_default_and_an_own_order(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ENGINE_BACKEND", raising=False)
    assert _op()(1) == "triton"
    assert _op()(0) == "chunked"  # triton declines; auto moves on
    own = _op(("cuda", "cpp", "chunked", "triton", "reference"))
    assert own(1) == "chunked"
    assert own.available() == ["chunked", "triton", "reference"]


def test_forcing_and_bad_orders(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ENGINE_BACKEND", "toy=triton")
    own = _op(("cuda", "cpp", "chunked", "triton", "reference"))
    assert own(1) == "triton"
    with pytest.raises(BackendError, match="needs x > 0"):
        own(0)
    with pytest.raises(ValueError, match="priority"):
        _op(("triton", "reference"))
