"""A small untrained run directory, laid out as python -m engine.train leaves one.

It lets the CLI and inference tests exercise loading, generation and error handling in
seconds, without training anything.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from engine.checkpoint import save_checkpoint
from engine.config import get_preset
from engine.model import Transformer
from engine.run_artifacts import RunDir
from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.vocab import Vocab
from engine.tokenizer.vqvae import VQVAE
from engine.trainer import make_optimizer


def make_untrained_run(root: Path, max_seq_len: int = 96):
    cfg = get_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, n_layers=1, d_model=32, n_heads=2, max_seq_len=max_seq_len)
    cfg.image = dataclasses.replace(cfg.image, channels=8, code_dim=8)
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg.save(run.config)
    vocab = Vocab.from_config(cfg.vocab)
    run.bpe.parent.mkdir(parents=True, exist_ok=True)
    TextTokenizer.train(["a red circle", "a blue square on the left"] * 20, vocab).save(run.bpe)
    torch.manual_seed(0)
    VQVAE(cfg.image, cfg.vocab.image_codes).save(run.vqvae)
    model = Transformer(cfg.model, vocab.size)
    save_checkpoint(root, 1, model, make_optimizer(model, cfg.train), {})
    return cfg, run
