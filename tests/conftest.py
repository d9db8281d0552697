"""Shared test switches.

- `cuda` tests skip without a GPU.
- `needs_native` skips a test when engine._C was not built (ENGINE_SKIP_NATIVE=1), saying
  why; with ENGINE_REQUIRE_NATIVE=1 (CI) the import already failed loudly instead.
- `triton_interpret` runs a test under the Triton interpreter on CPU (TRITON_INTERPRET=1 must
  be set before triton is imported, so it is set here, for the whole session, when no GPU is
  present and triton is installed).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine import _native  # noqa: E402

try:  # noqa: E402
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_native = pytest.mark.skipif(not _native.AVAILABLE, reason=str(_native.LOAD_ERROR))
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
