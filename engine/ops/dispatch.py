"""Backend dispatch shared by every op (the op contract in DESIGN.md).

Each op owns a plain-PyTorch `reference` and registers faster backends with the same
signature. Selection, per call:
  1. an explicit `backend=` argument,
  2. else the `ENGINE_BACKEND` environment variable: either one name for every op
     (`ENGINE_BACKEND=triton`) or per-op pairs (`ENGINE_BACKEND=attention=triton,cfg_sample=cpp`),
  3. else `auto`: the first backend in priority order (cuda, triton, cpp, chunked, reference,
     unless the op was given its own order from measurements) whose `supports(...)` accepts
     the call.
     Under TRITON_INTERPRET=1 auto never picks `triton`: the interpreter is a test vehicle for
     CPU machines, not a fast path; force it (argument or env) to run a kernel there.
A forced backend that is missing or refuses the inputs is an error naming why; `auto` falls
back silently only past backends that say they do not support the inputs, and logs its pick.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("engine.ops")

# `chunked`: reshapes the work (e.g. blocks of rows) to bound memory, with the library's
# matmuls and a small kernel or plain torch between them; preferred to the reference.
PRIORITY = ("cuda", "triton", "cpp", "chunked", "reference")


class BackendError(RuntimeError):
    """A forced backend cannot run the call (missing build, unsupported device/dtype/shape)."""


@dataclass
class Backend:
    name: str
    fn: Callable[..., Any]
    # supports(*args, **kwargs) -> None when it can run the call, else a reason string.
    supports: Callable[..., str | None]


def _always(*_args, **_kwargs) -> str | None:
    return None


class Op:
    def __init__(self, name: str, reference: Callable[..., Any],
                 priority: tuple[str, ...] = PRIORITY):
        if sorted(priority) != sorted(PRIORITY):
            raise ValueError(f"priority must order exactly {PRIORITY}; got {priority}")
        self.name = name
        self.priority = priority
        self.backends: dict[str, Backend] = {"reference": Backend("reference", reference, _always)}
        self._unavailable: dict[str, str] = {}
        self._last_auto: str | None = None

    def register(self, name: str, fn: Callable[..., Any],
                 supports: Callable[..., str | None] = _always) -> None:
        if name not in PRIORITY:
            raise ValueError(f"unknown backend kind {name!r}; expected one of {PRIORITY}")
        self.backends[name] = Backend(name, fn, supports)
        self._unavailable.pop(name, None)

    def mark_unavailable(self, name: str, reason: str) -> None:
        """Record why a backend could not be loaded, so forcing it says why."""
        if name not in self.backends:
            self._unavailable[name] = reason

    def forced_backend(self) -> str | None:
        env = os.environ.get("ENGINE_BACKEND", "").strip()
        if not env or env == "auto":
            return None
        if "=" not in env:
            return env
        for pair in env.split(","):
            op, _, backend = pair.partition("=")
            if op.strip() == self.name:
                return backend.strip() or None
        return None

    def select(self, *args, backend: str | None = None, **kwargs) -> Backend:
        choice = backend or self.forced_backend()
        if choice and choice != "auto":
            if choice not in self.backends:
                why = self._unavailable.get(choice, "no such backend is registered")
                raise BackendError(f"{self.name}: backend {choice!r} is not available ({why}); "
                                   f"available: {sorted(self.backends)}")
            b = self.backends[choice]
            reason = b.supports(*args, **kwargs)
            if reason is not None:
                raise BackendError(f"{self.name}: backend {choice!r} cannot run this call: {reason}")
            return b
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        for name in self.priority:
            b = self.backends.get(name)
            if b is None or (name == "triton" and interpreted):
                continue
            if b.supports(*args, **kwargs) is None:
                if name != self._last_auto:
                    log.debug("%s: auto picked %s", self.name, name)
                    self._last_auto = name
                return b
        raise AssertionError("the reference backend supports every call")

    def __call__(self, *args, backend: str | None = None, **kwargs):
        return self.select(*args, backend=backend, **kwargs).fn(*args, **kwargs)

    def available(self) -> list[str]:
        return [n for n in self.priority if n in self.backends]
