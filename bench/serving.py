"""engine.serve's batching: 16 clients at once, each asking for one image (no seed), answered
one engine call at a time against the batching worker, which runs the requests waiting
together in one call. Twice: all with the same settings (CFG 3), and with mixed ones (CFG
1.5/3/5, top-p 0.8/0.9/1, temperature 1/0.9/0.7 in turn), which also share one call, each
request sampled with its own. The tiny preset's model (4 blocks, d=256) with random weights;
the VQ decode is included. `x ref` is the one-at-a-time time over the row's, same settings.
"""
from __future__ import annotations

import time

import torch

from bench.common import Row, device_name
from engine.config import get_preset
from engine.inference import Engine, SamplingParams
from engine.model import Transformer
from engine.serve import Batcher
from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.document import DocumentTokenizer
from engine.tokenizer.vocab import Vocab
from engine.tokenizer.vqvae import VQVAE

CLIENTS = 16
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")


def _engine(device) -> Engine:
    cfg = get_preset("tiny")
    vocab = Vocab.from_config(cfg.vocab)
    captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab.size).to(device)
    vq = VQVAE(cfg.image, cfg.vocab.image_codes).eval()
    text = TextTokenizer.train(captions * 8, vocab)
    return Engine(model, DocumentTokenizer(vocab, text, vq, cfg.image.tokens_per_image),
                  cfg.image.image_size)


def _settings(client: int, mixed: bool) -> SamplingParams:
    if not mixed:
        return SamplingParams(cfg_scale=3.0)
    k = client % 3
    return SamplingParams(cfg_scale=(1.5, 3.0, 5.0)[k], top_p=(0.8, 0.9, 1.0)[k],
                          temperature=(1.0, 0.9, 0.7)[k])


def _serve_all(engine, max_batch: int, mixed: bool) -> float:
    batcher = Batcher(engine, max_batch)
    prompts = [f"a {COLOURS[i % 4]} {SHAPES[i // 4 % 4]}" for i in range(CLIENTS)]
    start = time.perf_counter()
    waiting = [batcher.submit([p], _settings(i, mixed), seeded=False)
               for i, p in enumerate(prompts)]
    for done in waiting:
        done.result()
    return (time.perf_counter() - start) * 1e3


def run(quick: bool) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = _engine(device)
    _serve_all(engine, 1, False)  # warm-up
    rows = []
    for mixed in (False, True):
        timed = {name: min(_serve_all(engine, mb, mixed) for _ in range(1 if quick else 3))
                 for name, mb in (("one_at_a_time", 1), ("batched", 32))}
        settings = "mixed settings" if mixed else "cfg 3"
        case = f"{CLIENTS} clients x 1 image, {settings}, tiny shapes (random weights)"
        rows += [Row("serving", case, name, ms, timed["one_at_a_time"] / ms,
                     extra={"images_per_s": CLIENTS / (ms * 1e-3)}, device=device_name(device))
                 for name, ms in timed.items()]
    return rows
