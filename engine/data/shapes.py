"""The built-in `shapes` dataset: coloured shapes on white, with English captions.

Generated on the fly (PIL + numpy, nothing to download). Every item is drawn from its own
RNG seeded by (seed, split, index), so random access is cheap and reproducible.

The train split never shows a HELD_OUT (colour, shape) pair, in any image; the heldout
split draws from a different seed stream over all pairs and over-represents the held-out
pairs, so "a red star" measures compositional generalisation, not memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart in hue, so that a colour survives VQ reconstruction and a
# sampled image is judged by its nearest palette colour without ambiguity.
# Eight colours: with every shape seen in seven colours instead of five, the tiny model
# factors colour from shape far better (held-out-pair colour at CFG 3, last weights: 71-81%
# over three 8-colour runs against 52-61% over three 6-colour runs of the same recipe).
# Ten (adding black and brown; with a 1,500-step VQ-VAE) was worse on every measure at the
# same budget (bench/results/tiny_recipe_colours_*.json).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (25, 55, 225),
    "yellow": (245, 215, 0),
    "orange": (250, 125, 0),
    "purple": (135, 30, 185),
    "cyan": (0, 185, 205),
    "pink": (235, 70, 160),
}
SHAPES = ("circle", "square", "triangle", "star")

# One pair per colour and per shape at most, so every colour and every shape is still seen
# in training (with other partners).
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"),
})

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELD_OUT)

# 3x3 grid cells, row-major, and the words a caption uses for them.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SIZES = ("small", "big")
SPLITS = ("train", "heldout")

_SUPERSAMPLE = 4            # draw at 4x and downsample: anti-aliased edges
_RADIUS = {"small": 0.16, "big": 0.26}   # half the shape's extent, as a fraction of the image
_P_SINGLE = 0.75


@dataclass
class ShapeExample:
    image: Image.Image
    caption: str
    objects: tuple[tuple[str, str, str], ...]   # (colour, shape, position word)
    # What draw_shapes drew: (colour, shape, cx, cy, radius) per object, so the same picture
    # can be redrawn with one thing changed (instruction tuning's edits).
    drawn: tuple[tuple[str, str, float, float, float], ...] = ()


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r            # a full-size square looks much heavier than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")


def _radius(size: str, image_size: int) -> float:
    """Half a shape's extent in pixels, whole so that shapes are pixel-aligned."""
    return float(round(_RADIUS[size] * image_size))


def _centre(position: str, radius: float, image_size: int, rng: np.random.Generator):
    """A jittered point inside the grid cell `position`, clamped so the shape stays whole."""
    row, col = divmod(POSITIONS.index(position), 3)
    cell = image_size / 3
    jitter = cell / 4
    lo, hi = radius + 1, image_size - radius - 1
    cx = np.clip((col + 0.5) * cell + rng.uniform(-jitter, jitter), lo, hi)
    cy = np.clip((row + 0.5) * cell + rng.uniform(-jitter, jitter), lo, hi)
    # Whole-pixel centres: a shape then looks the same wherever it sits (up to a shift),
    # which keeps the set of image patches the VQ-VAE must code small.
    return float(round(cx)), float(round(cy))


def draw_shapes(objects: list[tuple[str, str, float, float, float]], image_size: int) -> Image.Image:
    """Shapes on white at exact places; objects: (colour, shape, cx, cy, radius) in output
    pixels, radius = half the shape's extent; a colour is a COLOURS name or an RGB tuple."""
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for colour, shape, cx, cy, r in objects:
        fill = COLOURS[colour] if isinstance(colour, str) else tuple(colour)
        cx, cy, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, r * _SUPERSAMPLE
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def _check(colour: str, shape: str) -> None:
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(SHAPES)}")


def render_object(colour: str, shape: str, image_size: int, position: str | None = None,
                  size: str | None = None, rng: np.random.Generator | None = None) -> Image.Image:
    """One shape on white; position/size drawn from `rng` when not given."""
    _check(colour, shape)
    rng = rng if rng is not None else np.random.default_rng()
    position = position if position is not None else POSITIONS[rng.integers(len(POSITIONS))]
    size = size if size is not None else SIZES[rng.integers(len(SIZES))]
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of: {', '.join(POSITIONS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    r = _radius(size, image_size)
    cx, cy = _centre(position, r, image_size, rng)
    return draw_shapes([(colour, shape, cx, cy, r)], image_size)


def _where(position: str) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the center'."""
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def _single_caption(colour: str, shape: str, size: str, position: str,
                    rng: np.random.Generator, partial: bool) -> str:
    # The bare form is the evaluation prompt, so it is the most frequent one.
    where = _where(position)
    forms = [
        (0.40, f"a {colour} {shape}"),
        (0.15, f"a {size} {colour} {shape}"),
        (0.15, f"a {colour} {shape} {where}"),
        (0.15, f"a {size} {colour} {shape} {where}"),
        (0.075, f"a picture of a {colour} {shape}"),
        (0.075, f"there is a {colour} {shape} {where}"),
    ]
    if partial:
        # Train split: one caption in five (0.25 / 1.25) names only the colour or only the
        # shape, so each word must carry its meaning alone rather than through the pairs it
        # was seen in. Held-out-pair colour at CFG 3 (EMA 0.998, the same VQ-VAE), seeds
        # 0 / 1 / 2: 61.7 / 70.3 / 71.1% against 61.7 / 62.5 / 63.3% without. Worse: 40%
        # partial captions (53.9%, seed 1) and colour-only ones (67.2 / 57.0%, seeds 0 / 1)
        # (bench/results/tiny_partial_captions_*.json).
        forms += [(0.125, f"a {colour} shape"), (0.125, f"a {shape}")]
    return _choose(forms, rng)


def _pair_caption(a: tuple[str, str, str, str], b: tuple[str, str, str, str],
                  rng: np.random.Generator) -> str:
    (c1, s1, z1, p1), (c2, s2, z2, p2) = a, b
    forms = [
        (0.45, f"a {c1} {s1} and a {c2} {s2}"),
        (0.25, f"a {c1} {s1} {_where(p1)} and a {c2} {s2} {_where(p2)}"),
        (0.15, f"a {z1} {c1} {s1} and a {z2} {c2} {s2}"),
        (0.15, f"two shapes: a {c1} {s1} and a {c2} {s2}"),
    ]
    return _choose(forms, rng)


def _choose(forms: list[tuple[float, str]], rng: np.random.Generator) -> str:
    probs = np.array([p for p, _ in forms])
    return forms[rng.choice(len(forms), p=probs / probs.sum())][1]


def _overlaps(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (x1, y1, r1), (x2, y2, r2) = a, b
    gap = r1 + r2 + 1.0           # one pixel of white between two shapes
    return abs(x1 - x2) < gap and abs(y1 - y2) < gap


class ShapesDataset:
    """`size` captioned images of one or two shapes; item i is a pure function of
    (seed, split, i)."""

    def __init__(self, split: str = "train", image_size: int = 32, size: int = 10_000,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small to draw shapes; use >= 16")
        self.split, self.image_size, self.size, self.seed = split, image_size, size, seed
        self._split_id = SPLITS.index(split)

    def __len__(self) -> int:
        return self.size

    def _pair(self, rng: np.random.Generator, force_heldout: bool) -> tuple[str, str]:
        if self.split == "train":
            pool = TRAIN_PAIRS
        else:
            pool = HELD_OUT_PAIRS if force_heldout else ALL_PAIRS
        return pool[rng.integers(len(pool))]

    def __getitem__(self, i: int) -> ShapeExample:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        rng = np.random.default_rng([self.seed, self._split_id, i])
        # Heldout split: half the items feature a held-out pair (the first object).
        heldout_first = self.split == "heldout" and rng.random() < 0.5
        n = 1 if rng.random() < _P_SINGLE else 2
        first = self._pair(rng, heldout_first)
        pairs = [first]
        if n == 2:
            second = self._pair(rng, False)
            while second == first:
                second = self._pair(rng, False)
            pairs.append(second)
        placed = self._place(n, rng)
        s = self.image_size
        drawn = tuple((c, sh, cx, cy, _radius(z, s)) for (c, sh), (pos, z, cx, cy) in zip(pairs, placed))
        image = draw_shapes(list(drawn), s)
        full = [(c, sh, z, pos) for (c, sh), (pos, z, _, _) in zip(pairs, placed)]
        if n == 1:
            c, sh, z, pos = full[0]
            caption = _single_caption(c, sh, z, pos, rng, partial=self.split == "train")
        else:
            caption = _pair_caption(full[0], full[1], rng)
        return ShapeExample(image=image, caption=caption,
                            objects=tuple((c, sh, pos) for c, sh, _, pos in full), drawn=drawn)

    def _place(self, n: int, rng: np.random.Generator) -> list[tuple[str, str, float, float]]:
        """(position word, size word, cx, cy) for n shapes that do not touch."""
        s = self.image_size
        for _ in range(100):
            cells = rng.choice(len(POSITIONS), size=n, replace=False)
            # Two big shapes rarely fit side by side; favour small ones in pairs.
            sizes = [SIZES[int(rng.random() < (0.5 if n == 1 else 0.25))] for _ in range(n)]
            out, boxes = [], []
            for cell, z in zip(cells, sizes):
                pos = POSITIONS[int(cell)]
                r = _radius(z, s)
                cx, cy = _centre(pos, r, s, rng)
                out.append((pos, z, cx, cy))
                boxes.append((cx, cy, r))
            if n == 1 or not _overlaps(boxes[0], boxes[1]):
                return out
        # Unreachable in practice (opposite corners always fit); kept deterministic anyway.
        r = _radius("small", s)
        return [("top left", "small", *_centre("top left", r, s, rng)),
                ("bottom right", "small", *_centre("bottom right", r, s, rng))][:n]
