"""Small random engines for the inference tests: the tiny preset's layout, shrunk.

The machine is shared, so the tests pin torch to one thread: a tiny model's matmuls are
faster on one core than contending for two.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import ImageConfig, get_preset
from engine.inference.engine import Engine
from engine.model import Transformer
from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.document import DocumentTokenizer
from engine.tokenizer.vocab import Vocab
from engine.tokenizer.vqvae import VQVAE

torch.set_num_threads(1)

CAPTIONS = ["a red circle", "a blue square on the left", "a small green triangle",
            "what colour is the shape?", "make it blue", "two shapes: a red circle and a square"]
IMAGE = ImageConfig(image_size=16, downsample=4, channels=8, code_dim=8)   # 16 codes per image


def build_engine(max_seq_len: int = 96, n_layers: int = 2, d_model: int = 64, seed: int = 0,
                 n_kv_heads: int | None = None) -> Engine:
    cfg = get_preset("tiny")
    vocab = Vocab.from_config(cfg.vocab)
    torch.manual_seed(seed)
    model_cfg = dataclasses.replace(cfg.model, n_layers=n_layers, d_model=d_model,
                                    max_seq_len=max_seq_len, n_kv_heads=n_kv_heads,
                                    tie_embeddings=False)
    model = Transformer(model_cfg, vocab.size).eval()
    # A larger output scale makes sharper distributions than init_std's near-uniform ones,
    # so greedy near-ties are rare; untied, so the model does not just echo its last token.
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    text = TextTokenizer.train(CAPTIONS * 4, vocab)
    vq = VQVAE(IMAGE, vocab.image_codes).eval()
    return Engine(model, DocumentTokenizer(vocab, text, vq, IMAGE.tokens_per_image), IMAGE.image_size)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return build_engine()


@pytest.fixture(scope="session")
def gqa_engine() -> Engine:
    return build_engine(n_kv_heads=2, seed=1)
