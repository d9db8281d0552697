"""Loads engine._C (the C++/CUDA ops under torch.ops.engine) and says why when it cannot.

Backends built from it register only when it loads; forcing one of them without it is an
error that carries `LOAD_ERROR`. ENGINE_REQUIRE_NATIVE=1 (set by CI) turns a missing
extension into an import-time error instead of skipped tests.
"""
from __future__ import annotations

import os

import torch  # noqa: F401  (engine._C links against libtorch; load torch first)

try:
    from engine import _C  # noqa: F401
    LOAD_ERROR: str | None = None
except ImportError as exc:  # built with ENGINE_SKIP_NATIVE=1, or not built at all
    LOAD_ERROR = (f"engine._C is not built ({exc}); run `pip install --no-build-isolation -e .` "
                  "without ENGINE_SKIP_NATIVE=1")
    if os.environ.get("ENGINE_REQUIRE_NATIVE") == "1":
        raise ImportError(LOAD_ERROR) from exc

AVAILABLE = LOAD_ERROR is None

