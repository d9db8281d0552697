"""Which palette colour an image shows: the judge for "is the red circle red?".

Each pixel far enough from white votes for the palette colour whose white->colour segment
passes closest to it. Measuring against the segment rather than the colour itself keeps
anti-aliased edges (a colour blended with the white background) voting for their own
colour: a half-white red is pink, which is nearer to plain orange than to plain red.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from engine.data.shapes import COLOURS

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32) / 255.0   # [K, 3]
_WHITE = np.ones(3, dtype=np.float32)
# A pixel counts as ink when it is this far (RGB, [0, 1] units) from white; the closest
# palette colour to white (pink) is ~0.82 away, so edges blended >= 30% still count.
_INK_DISTANCE = 0.25
# Fewer ink pixels than this fraction of the image: the image is (almost) blank.
_BLANK_FRACTION = 0.004


def palette_votes(img: Image.Image) -> np.ndarray:
    """Per-palette-colour vote counts [K] over the ink pixels of `img`."""
    px = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0
    ink = px[np.linalg.norm(px - _WHITE, axis=1) > _INK_DISTANCE]
    if len(ink) == 0:
        return np.zeros(len(_NAMES), dtype=np.int64)
    # Distance from each pixel to each segment white + t (colour - white), t in [0, 1].
    direction = _PALETTE - _WHITE                                   # [K, 3]
    rel = ink - _WHITE                                              # [N, 3]
    t = np.clip(rel @ direction.T / (direction ** 2).sum(1), 0, 1)  # [N, K]
    closest = _WHITE + t[..., None] * direction[None]               # [N, K, 3]
    dist = np.linalg.norm(ink[:, None, :] - closest, axis=2)
    return np.bincount(dist.argmin(1), minlength=len(_NAMES))


def dominant_colour(img: Image.Image) -> str | None:
    """The palette colour most ink pixels vote for; None for an (almost) blank image."""
    votes = palette_votes(img)
    if votes.sum() < max(3, _BLANK_FRACTION * img.width * img.height):
        return None
    return _NAMES[int(votes.argmax())]
