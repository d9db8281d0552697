"""A small CNN that names the shape in an image: the judge for "is the red circle a circle?".

It is trained by the repo on freshly rendered single shapes of ALL colour-shape pairs,
held-out pairs included (it judges shapes, not the generative model), at continuous
positions and sizes, with colour jitter, blur and noise so that VQ reconstructions and
sampled images (slightly soft, slightly off-colour) are judged like clean renders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from engine.data.shapes import COLOURS, SHAPES, draw_shapes

_SIZE_RANGE = (0.13, 0.29)     # half-extent / image size; the dataset uses 0.16 and 0.26


class ShapeClassifier(nn.Module):
    def __init__(self, image_size: int, shapes: tuple[str, ...] = SHAPES, width: int = 16):
        super().__init__()
        self.image_size, self.shapes = image_size, tuple(shapes)

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2),
                                      block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 2 * width))
        # Max-pooling over space makes the verdict independent of where the shape sits.
        self.head = nn.Linear(2 * width, len(self.shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1).amax(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        for im in images:
            if im.size != (self.image_size, self.image_size):
                raise ValueError(f"the shape classifier expects {self.image_size}x"
                                 f"{self.image_size} images, got {im.size[0]}x{im.size[1]}")
        self.eval()
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
        logits = torch.cat([self(chunk) for chunk in x.split(256)])
        return [self.shapes[i] for i in logits.argmax(1).tolist()]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"image_size": str(self.image_size), "shapes": json.dumps(self.shapes)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ShapeClassifier":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "image_size" not in meta:
            raise ValueError(f"{path} is not a shape-classifier checkpoint (no image_size metadata)")
        model = cls(int(meta["image_size"]), tuple(json.loads(meta["shapes"])))
        model.load_state_dict(load_file(str(path)))
        return model.eval()


def render_batch(n: int, image_size: int, rng: np.random.Generator,
                 augment: bool = True) -> tuple[list[Image.Image], list[int]]:
    """n single shapes of random colour, shape, place and size; labels index SHAPES."""
    names = list(COLOURS)
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(SHAPES)))
        rgb = np.array(COLOURS[names[rng.integers(len(names))]], dtype=np.int64)
        if augment:
            rgb = np.clip(rgb + rng.integers(-40, 41, size=3), 0, 255)
        r = rng.uniform(*_SIZE_RANGE) * image_size
        cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
        img = draw_shapes([(tuple(int(v) for v in rgb), SHAPES[label], cx, cy, r)], image_size)
        if augment and rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
        images.append(img)
        labels.append(label)
    return images, labels


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def train_shape_classifier(image_size: int = 32, steps: int = 150, seed: int = 0,
                           progress: bool = True, batch_size: int = 64) -> ShapeClassifier:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    model = ShapeClassifier(image_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="shape classifier", disable=not progress, dynamic_ncols=True)
    for step in bar:
        images, labels = render_batch(batch_size, image_size, rng)
        x = _to_tensor(images)
        x = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
        logits = model(x)
        y = torch.tensor(labels)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and step % 10 == 0:
            acc = (logits.argmax(1) == y).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    bar.close()
    return model.eval()


def accuracy_on_fresh_renders(model: ShapeClassifier, n: int = 1_000, seed: int = 123) -> float:
    """Accuracy on clean renders the classifier has never seen (a different RNG stream)."""
    images, labels = render_batch(n, model.image_size, np.random.default_rng([seed, 11]),
                                  augment=False)
    preds = model.predict(images)
    return float(np.mean([p == SHAPES[y] for p, y in zip(preds, labels)]))
