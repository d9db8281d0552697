"""The dual encoder: a text tower and an image tower into one L2-normalised space.

Text tower: BPE ids -> embeddings + positions -> a small transformer encoder -> masked mean
-> linear. Image tower: VQ codes (not pixels: the training corpus is stored as codes, and a
code embedding already abstracts the pixels) -> embeddings on the g x g grid -> a 3x3 conv
-> adaptive pooling to 3 x 3 (the grid a caption's position words name, so "top left" stays
visible) -> linear. One extra code id stands for a dropped code (query dropout).

A document's embedding is the L2-normalised mean of its normalised text and image embeddings;
a text-only or image-only document uses the one it has. Re-normalising keeps every score a
cosine in [-1, 1], so the 0.9 near-duplicate threshold means the same for all documents.

`score(prompt_text, images)` is the CLIP-style re-ranker for n samples per prompt; it plugs
into the generation engine as its `Scorer` (engine.inference.params) once a tokenizer is
attached (`DualEncoder.load(path, tokenizer=...)` or `.attach(tokenizer)`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.config import RetrievalConfig

MAX_CAPTION = 64     # text positions; longer captions are cut (a retrieval query needs few)


class TextTower(nn.Module):
    def __init__(self, text_size: int, width: int, layers: int, embed_dim: int):
        super().__init__()
        self.tok = nn.Embedding(text_size, width)
        self.pos = nn.Embedding(MAX_CAPTION, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids [B, L] (padding anywhere valid is False) -> [B, embed_dim], normalised."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tok(ids) + self.pos(pos), src_key_padding_mask=~valid)
        w = valid.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.normalize(self.proj(pooled), dim=-1)


class ImageTower(nn.Module):
    def __init__(self, image_codes: int, grid: int, width: int, embed_dim: int):
        super().__init__()
        self.grid = grid
        self.dropped = image_codes           # the id of a dropped code
        self.code = nn.Embedding(image_codes + 1, width)
        # One 3x3 conv keeps an encoder step cheap on CPU (a second one doubled its cost); a
        # code embedding already describes a whole patch of pixels.
        self.convs = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.proj = nn.Linear(9 * width, embed_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, g*g] in [0, image_codes] -> [B, embed_dim], normalised."""
        b = codes.shape[0]
        x = self.code(codes).view(b, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        x = self.pool(self.convs(x)).flatten(1)
        return F.normalize(self.proj(x), dim=-1)


def pad_captions(captions: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged caption ids -> (ids [B, L], valid [B, L]); an empty caption keeps one pad slot
    marked valid so that pooling never divides by zero (it then encodes "nothing")."""
    length = max(1, min(MAX_CAPTION, max((len(c) for c in captions), default=1)))
    ids = torch.zeros((len(captions), length), dtype=torch.long)
    valid = torch.zeros((len(captions), length), dtype=torch.bool)
    for i, c in enumerate(captions):
        c = list(c)[:length]
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        valid[i, :max(1, len(c))] = True
    return ids.to(device), valid.to(device)


class DualEncoder(nn.Module):
    def __init__(self, text_size: int, image_codes: int, grid: int, cfg: RetrievalConfig):
        super().__init__()
        self.meta = {"text_size": text_size, "image_codes": image_codes, "grid": grid,
                     "width": cfg.width, "text_layers": cfg.text_layers, "embed_dim": cfg.embed_dim}
        self.text = TextTower(text_size, cfg.width, cfg.text_layers, cfg.embed_dim)
        self.image = ImageTower(image_codes, grid, cfg.width, cfg.embed_dim)
        # CLIP's learnable temperature, initialised at 1/0.07.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.tokenizer = None     # a DocumentTokenizer, for score() on raw text and pictures

    @property
    def device(self) -> torch.device:
        return self.log_scale.device

    @property
    def embed_dim(self) -> int:
        return self.meta["embed_dim"]

    # -- embeddings ------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, valid = pad_captions(captions, self.device)
        return self.text(ids, valid)

    def encode_image(self, codes: torch.Tensor) -> torch.Tensor:
        return self.image(torch.as_tensor(codes, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def encode_documents(self, captions: Sequence[Sequence[int]] | None = None,
                         codes: torch.Tensor | None = None, batch: int = 1024) -> torch.Tensor:
        """Document embeddings [N, embed_dim] (float32, CPU): normalised mean of the towers
        a document has. Give captions, codes, or both (same N)."""
        if captions is None and codes is None:
            raise ValueError("a document needs a caption, an image, or both")
        n = len(captions) if captions is not None else len(codes)
        if captions is not None and codes is not None and len(codes) != n:
            raise ValueError(f"{n} captions but {len(codes)} images")
        was = self.training
        self.eval()
        out = []
        for s in range(0, n, batch):
            parts = []
            if captions is not None:
                parts.append(self.encode_text(captions[s:s + batch]))
            if codes is not None:
                parts.append(self.encode_image(codes[s:s + batch]))
            out.append(F.normalize(sum(parts) / len(parts), dim=-1).float().cpu())
        self.train(was)
        return torch.cat(out) if out else torch.zeros((0, self.embed_dim))

    # -- the re-ranker ---------------------------------------------------------------------
    def attach(self, tokenizer) -> "DualEncoder":
        """Gives score() a DocumentTokenizer (BPE + VQ-VAE) for raw text and PIL images."""
        self.tokenizer = tokenizer
        return self

    @torch.no_grad()
    def score(self, prompt_text: str, images) -> torch.Tensor:
        """Cosine of the prompt's text embedding with each image's: [len(images)], or a 0-d
        tensor for one PIL image (so float(score(text, image)) is an engine Scorer)."""
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer: DualEncoder.load(path, tokenizer=...) "
                             "or encoder.attach(DocumentTokenizer)")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            return torch.zeros(0)
        was = self.training
        self.eval()
        t = self.encode_text([self.tokenizer.text.encode(prompt_text)])
        codes = torch.tensor(self.tokenizer.image_codes(images), dtype=torch.long)
        scores = (self.encode_image(codes) @ t[0]).float().cpu()
        self.train(was)
        return scores[0] if single else scores

    def forward(self, captions: Sequence[Sequence[int]], codes: torch.Tensor):
        """Training: (text embeddings, image embeddings, logit scale)."""
        return self.encode_text(captions), self.encode_image(codes), self.log_scale.exp().clamp(max=100)

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"dual_encoder": json.dumps(self.meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, tokenizer=None, device="cpu") -> "DualEncoder":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: train the run with retrieval on "
                                    "(python -m engine.train --retrieve 2)")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("dual_encoder")
        if raw is None:
            raise ValueError(f"{path} is not a dual encoder file (no 'dual_encoder' metadata)")
        m = json.loads(raw)
        cfg = RetrievalConfig(width=m["width"], text_layers=m["text_layers"], embed_dim=m["embed_dim"])
        enc = cls(m["text_size"], m["image_codes"], m["grid"], cfg)
        enc.load_state_dict(load_file(str(path)))
        enc.tokenizer = tokenizer
        return enc.to(device).eval()
