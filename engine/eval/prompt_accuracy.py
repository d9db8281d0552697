"""Does "a red star" give a red star? Prompt accuracy over every colour-shape pair.

The prompts use the bare caption form "a {colour} {shape}" that the shapes dataset
emits most often. Held-out pairs never appear in training, so their accuracy measures
composition rather than recall. Colour is judged by `dominant_colour`, shape by the
repo-trained `ShapeClassifier`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from engine.data.shapes import ALL_PAIRS, HELD_OUT
from engine.eval.colour import dominant_colour
from engine.eval.shape_classifier import ShapeClassifier

Generate = Callable[[list[str], float], list[Image.Image]]
GRID_DRAWS = 4        # draws per pair shown in grid_cfg<scale>.png


def prompt_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def evaluate_prompts(generate: Generate, classifier: ShapeClassifier,
                     cfg_scales: Sequence[float] = (1.0, 3.0, 5.0), samples_per_pair: int = 4,
                     seed: int = 0, grid_dir: str | Path | None = None) -> dict:
    """Per CFG scale: colour accuracy and colour-and-shape accuracy, over all pairs and over
    the held-out pairs. With `grid_dir`, also writes grid_cfg{scale}.png there.

    Returns {"cfg_<scale>": {"colour": .., "colour_heldout": .., "colour_shape": ..,
    "colour_shape_heldout": .., "blank": ..}, "pairs": .., "samples_per_pair": ..}.
    """
    if samples_per_pair < 1:
        raise ValueError("samples_per_pair must be >= 1")
    targets = [p for p in ALL_PAIRS for _ in range(samples_per_pair)]
    prompts = [prompt_for(c, s) for c, s in targets]
    report: dict = {"pairs": len(ALL_PAIRS), "held_out_pairs": len(HELD_OUT),
                    "samples_per_pair": samples_per_pair}
    for k, scale in enumerate(cfg_scales):
        # The same seed per scale: scales differ by guidance, not by sampling luck.
        torch.manual_seed(seed)
        images = generate(prompts, float(scale))
        if len(images) != len(prompts):
            raise ValueError(f"generate returned {len(images)} images for {len(prompts)} prompts")
        colours = [dominant_colour(im) for im in images]
        shapes = classifier.predict(images)
        report[f"cfg_{scale:g}"] = _score(targets, colours, shapes)
        if grid_dir is not None:
            Path(grid_dir).mkdir(parents=True, exist_ok=True)
            # At most GRID_DRAWS draws per pair: a picture to look at, not the whole sample.
            shown = [i for i in range(len(prompts)) if i % samples_per_pair < GRID_DRAWS]
            labels = [f"{prompts[i]}\n-> {colours[i] or 'blank'} {shapes[i]}" for i in shown]
            save_prompt_grid([images[i] for i in shown], labels,
                             Path(grid_dir) / f"grid_cfg{scale:g}.png",
                             columns=min(samples_per_pair, GRID_DRAWS) * 4)
    return report


def _score(targets, colours, shapes) -> dict:
    def mean(flags):
        flags = list(flags)
        return round(sum(flags) / len(flags), 4) if flags else float("nan")
    colour_ok = [c == t[0] for c, t in zip(colours, targets)]
    both_ok = [ok and s == t[1] for ok, s, t in zip(colour_ok, shapes, targets)]
    held = [t in HELD_OUT for t in targets]
    return {
        "colour": mean(colour_ok),
        "colour_heldout": mean(ok for ok, h in zip(colour_ok, held) if h),
        "colour_shape": mean(both_ok),
        "colour_shape_heldout": mean(ok for ok, h in zip(both_ok, held) if h),
        "blank": mean(c is None for c in colours),
    }


def fit_label(label: str, width_of, width: float, max_lines: int = 2) -> str:
    """`label` word-wrapped to lines no wider than `width` (as `width_of` measures them), at
    most `max_lines` of them, the last cut with an ellipsis: a long caption must not run into
    the next tile's label."""
    lines: list[str] = []
    for paragraph in label.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and width_of(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsis(lines[-1] + "…", width_of, width)
    return "\n".join(_ellipsis(line, width_of, width) for line in lines)


def _ellipsis(line: str, width_of, width: float) -> str:
    """`line` itself if it fits, else its longest prefix that fits with "…" after it."""
    if width_of(line) <= width:
        return line
    line = line.rstrip("…")
    while line and width_of(line + "…") > width:
        line = line[:-1]
    return line + "…"


def save_prompt_grid(images: list[Image.Image], labels: list[str], path: str | Path,
                     columns: int = 8, scale: int = 4) -> Path:
    """A PNG grid: each image upscaled `scale`x (nearest, so pixels stay visible) with its
    label (may hold one newline) underneath."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=11)
    label_h = 30
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    pad = 4
    cell_w = max(cw, 150)
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (ch + label_h + pad) + pad),
                     (200, 200, 200))
    draw = ImageDraw.Draw(grid)
    for k, (im, label) in enumerate(zip(images, labels)):
        r, c = divmod(k, columns)
        x, y = pad + c * (cell_w + pad), pad + r * (ch + label_h + pad)
        grid.paste(im.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST),
                   (x + (cell_w - cw) // 2, y))
        text = fit_label(label, lambda t: draw.textlength(t, font=font), cell_w - 4)
        draw.multiline_text((x + 2, y + ch + 2), text, fill=(0, 0, 0), font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
