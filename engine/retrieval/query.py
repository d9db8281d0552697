"""Forming a retrieval query: the paper drops 20% of the query document's tokens.

Dropping makes the query a noisy view of its document, so that the nearest neighbours are
documents that agree on most of the content rather than the document's own near-copies; the
dual encoder is trained on the same noise so that a dropped query still lands near its
document. Text tokens are removed (at least one is kept); image codes are replaced by the
image tower's "dropped" id, because the tower reads codes on a fixed grid.
"""
from __future__ import annotations

import numpy as np
import torch


def drop_caption(caption: list[int], p: float, rng: np.random.Generator) -> list[int]:
    if p <= 0 or len(caption) <= 1:
        return list(caption)
    keep = rng.random(len(caption)) >= p
    if not keep.any():
        keep[rng.integers(len(caption))] = True
    return [t for t, k in zip(caption, keep) if k]


def drop_codes(codes: torch.Tensor, p: float, dropped_id: int, rng: np.random.Generator) -> torch.Tensor:
    """codes [B, T] -> a copy with each code replaced by dropped_id with probability p."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if p <= 0:
        return codes.clone()
    mask = torch.from_numpy(rng.random(tuple(codes.shape)) < p)
    return codes.masked_fill(mask, dropped_id)
