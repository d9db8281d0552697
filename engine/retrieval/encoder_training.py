"""Training the dual encoder: symmetric InfoNCE over (caption, image) pairs of the corpus.

Both directions (text->image and image->text) with CLIP's learnable temperature. Captions
repeat a lot in caption-image corpora (the shapes data says "a red circle" for every red
circle), so two pairs of one batch with the identical caption are not negatives of each other:
the target of a row spreads evenly over every column with its caption (multi-positive
InfoNCE). Training applies the query dropout (engine.retrieval.query) to both towers, so
dropped queries still land near their documents.

Given a state path, the loop saves its whole state there (weights, AdamW, the batch and
dropout generator) every SAVE_EVERY_S seconds and when a stop is requested, and a later call
resumes from it, ending with the weights of a run that never stopped.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import RetrievalConfig
from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.query import drop_caption, drop_codes
from engine.retrieval.selection import caption_keys
from engine.stop_request import TrainingStopped
from engine.training_state import load_state, save_state

log = logging.getLogger("engine.retrieval")
SAVE_EVERY_S = 600.0   # a crash loses at most this much of the encoder's training


def info_nce(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor,
             keys: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; keys [B]: pairs with equal keys are positives."""
    logits = scale * text @ image.T
    pos = (keys[:, None] == keys[None, :]).to(logits.dtype)
    target = pos / pos.sum(1, keepdim=True)
    t2i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    i2t = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (t2i + i2t) / 2


def _identity(n: int, seed: int, cfg: RetrievalConfig) -> dict:
    """What a saved state must match to be resumed."""
    return {"documents": n, "seed": seed, "retrieval": dict(sorted(vars(cfg).items()))}


def _save_state(path: Path, step: int, enc, opt, rng: np.random.Generator, identity: dict):
    save_state(path, identity, step=step,
               model={k: v.detach().cpu() for k, v in enc.state_dict().items()},
               optimizer=opt.state_dict(), rng=rng.bit_generator.state)


def _load_state(path: Path, enc, opt, rng: np.random.Generator, identity: dict) -> int:
    blob = load_state(path, identity, "dual-encoder", "train the encoder from the start")
    enc.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    rng.bit_generator.state = blob["rng"]
    return blob["step"]


def train_dual_encoder(captions: list[list[int]], codes: torch.Tensor, text_size: int,
                       image_codes: int, grid: int, cfg: RetrievalConfig, seed: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True,
                       state_path: Path | None = None, stop=None,
                       save_every_s: float = SAVE_EVERY_S) -> DualEncoder:
    """captions: BPE ids per document; codes [N, grid*grid] (not offset into the vocab).
    With `state_path`, the loop's state is saved there as the module says, and `stop` (an
    engine.stop_request.StopRequests) ends it after the step in hand with TrainingStopped.
    The caller deletes the state once it has kept the encoder."""
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
    identity = _identity(n, seed, cfg)
    first = 0
    if state_path is not None and Path(state_path).is_file():
        first = _load_state(Path(state_path), enc, opt, rng, identity)
    t0 = last_save = time.time()
    bar = tqdm(range(first, cfg.encoder_steps), initial=first, total=cfg.encoder_steps,
               desc="dual encoder", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = cfg.encoder_lr * min(1.0, (step + 1) / warmup) * \
            0.5 * (1 + np.cos(np.pi * step / cfg.encoder_steps))
        for g in opt.param_groups:
            g["lr"] = float(lr)   # a numpy float would not load from the saved state
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
        done = step + 1
        stopping = stop is not None and stop.reason is not None
        if state_path is not None and done < cfg.encoder_steps and \
                (stopping or time.time() - last_save >= save_every_s):
            _save_state(Path(state_path), done, enc, opt, rng, identity)
            last_save = time.time()
            if stopping:
                bar.close()
                raise TrainingStopped(done, stop.reason, stage="dual encoder")
    bar.close()
    log.info("dual encoder: %d steps in %.0f s", cfg.encoder_steps - first, time.time() - t0)
    return enc.eval()
