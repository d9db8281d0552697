"""Inference: the generation engine (batched CFG, constraints, infilling) and the KV cache.

Importing this package stays cheap: engine.model imports kv_cache from here, so the engine's
names are loaded lazily on first use.
"""
from __future__ import annotations

_EXPORTS = {
    "Engine": "engine.inference.engine",
    "SamplingParams": "engine.inference.params",
    "GenerationResult": "engine.inference.params",
    "Sample": "engine.inference.params",
    "MASK": "engine.inference.prompts",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.inference' has no attribute {name!r}")
