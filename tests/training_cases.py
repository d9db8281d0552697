"""What the training-loop tests share: the tiny preset's vocabulary, a one-block model shape
and a stream of random documents (a stream_factory for engine.trainer.train_model)."""
from __future__ import annotations

import dataclasses

import torch

from engine.config import ModelConfig, get_preset
from engine.tokenizer.vocab import Vocab

VOCAB = Vocab.from_config(get_preset("tiny").vocab)


def small_model_config(n_layers: int = 1, d_model: int = 32) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny").model, n_layers=n_layers, d_model=d_model,
                               n_heads=2, max_seq_len=64)


def random_documents(seed: int, lengths: tuple[int, int] = (20, 20)):
    """<bos> and random text ids, forever; each document's length drawn from [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    while True:
        n = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=g))
        yield [VOCAB.bos] + torch.randint(VOCAB.bpe_start, VOCAB.size, (n,), generator=g).tolist()
