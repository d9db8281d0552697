"""Training the dual encoder: symmetric InfoNCE over (caption, image) pairs of the corpus.

Both directions (text->image and image->text) with CLIP's learnable temperature. Captions
repeat a lot in caption-image corpora (the shapes data says "a red circle" for every red
circle), so two pairs of one batch with the identical caption are not negatives of each other:
the target of a row spreads evenly over every column with its caption (multi-positive
InfoNCE). Training applies the query dropout (engine.retrieval.query) to both towers, so
dropped queries still land near their documents.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import RetrievalConfig
from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.query import drop_caption, drop_codes
from engine.retrieval.selection import caption_keys

log = logging.getLogger("engine.retrieval")


def info_nce(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor,
             keys: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; keys [B]: pairs with equal keys are positives."""
    logits = scale * text @ image.T
    pos = (keys[:, None] == keys[None, :]).to(logits.dtype)
    target = pos / pos.sum(1, keepdim=True)
    t2i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    i2t = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (t2i + i2t) / 2


def train_dual_encoder(captions: list[list[int]], codes: torch.Tensor, text_size: int,
                       image_codes: int, grid: int, cfg: RetrievalConfig, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True) -> DualEncoder:
    """captions: BPE ids per document; codes [N, grid*grid] (not offset into the vocab)."""
    n = len(captions)
    if n < 2:
        raise ValueError(f"the dual encoder needs at least 2 caption-image pairs, got {n}")
    if codes.shape[0] != n:
        raise ValueError(f"{n} captions but {codes.shape[0]} images")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = DualEncoder(text_size, image_codes, grid, cfg).to(device).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.encoder_lr, weight_decay=0.01)
    keys = torch.from_numpy(caption_keys(captions))
    batch = min(cfg.encoder_batch, n)
    warmup = max(1, cfg.encoder_steps // 20)
    t0 = time.time()
    bar = tqdm(range(cfg.encoder_steps), desc="dual encoder", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = cfg.encoder_lr * min(1.0, (step + 1) / warmup) * \
            0.5 * (1 + np.cos(np.pi * step / cfg.encoder_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.choice(n, size=batch, replace=False)
        caps = [drop_caption(captions[i], cfg.query_dropout, rng) for i in idx]
        img = drop_codes(codes[torch.from_numpy(idx)], cfg.query_dropout, image_codes, rng)
        text_e, image_e, scale = enc(caps, img.to(device))
        loss = info_nce(text_e, image_e, scale, keys[torch.from_numpy(idx)].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
    log.info("dual encoder: %d steps in %.0f s, final InfoNCE %.3f", cfg.encoder_steps,
             time.time() - t0, loss.item())
    return enc.eval()
