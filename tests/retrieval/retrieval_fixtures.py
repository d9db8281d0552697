"""A small synthetic corpus for the retrieval tests (fixtures in conftest.py).

Documents are one of 12 "concepts": a caption (a few BPE-range ids) and an image whose codes
are the concept's pattern with a little noise; some documents are exact copies (same caption,
or same codes) so that the duplicate rules have something to skip.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.config import RetrievalConfig
from engine.data.corpus import EncodedCorpus

TEXT_SIZE, CODES, GRID = 200, 32, 4


def make_corpus(n: int = 240, seed: int = 0) -> tuple[EncodedCorpus, np.ndarray]:
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, CODES, size=(12, GRID * GRID))
    captions, codes, concept = [], [], []
    for i in range(n):
        c = int(rng.integers(12))
        cap = [30 + c, 60 + int(rng.integers(3))] + ([100 + int(rng.integers(40))] if i % 3 else [])
        img = patterns[c].copy()
        noise = rng.random(GRID * GRID) < 0.2
        img[noise] = rng.integers(0, CODES, size=int(noise.sum()))
        captions.append(cap)
        codes.append(img)
        concept.append(c)
    # exact duplicates: doc 1 repeats doc 0's codes, doc 3 repeats doc 2's caption
    codes[1] = codes[0].copy()
    captions[3] = list(captions[2])
    return EncodedCorpus(captions, torch.tensor(np.array(codes))), np.array(concept)


def small_cfg(**kw) -> RetrievalConfig:
    base = dict(enabled=True, k=2, embed_dim=32, width=32, text_layers=1, encoder_steps=80,
                encoder_batch=64, encoder_lr=3e-3, candidates=8, shards=3)
    base.update(kw)
    return RetrievalConfig(**base)
