"""Tokenised image-caption corpora on disk, and the stream of training documents.

An EncodedCorpus is what a large run would shard: per document the caption's BPE ids and the
image's VQ codes, stored as flat safetensors arrays (codes [N, T], caption ids flattened with
offsets), so loading is a memory map, not a pickle. `document_stream` turns it into an endless
stream of training sequences: modality order, CFG condition dropout, then the CM3 transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.config import DataConfig, ImageConfig, TrainConfig
from engine.data.cm3 import cm3_transform, drop_condition, join_segments
from engine.tokenizer.vocab import Vocab


def _shapes(split: str, image: ImageConfig, size: int, seed: int):
    from engine.data.shapes import ShapesDataset
    return ShapesDataset(split=split, image_size=image.image_size, size=size, seed=seed)


# name -> factory(split, image config, size, seed) returning a dataset of ShapeExample-likes
# (.image PIL, .caption str).
DATASETS: dict[str, Callable] = {"shapes": _shapes}


def load_dataset(name: str, split: str, image: ImageConfig, size: int, seed: int = 0):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name](split, image, size, seed)


@dataclass
class EncodedCorpus:
    captions: list[list[int]]      # BPE ids in the mixed vocab
    codes: torch.Tensor            # [N, tokens_per_image] image codes (not yet offset)

    def __len__(self) -> int:
        return len(self.captions)

    def save(self, path: str | Path) -> None:
        flat = torch.tensor([t for c in self.captions for t in c], dtype=torch.int32)
        offsets = torch.tensor(np.cumsum([0] + [len(c) for c in self.captions]), dtype=torch.int64)
        tmp = Path(str(path) + ".tmp")
        save_file({"codes": self.codes.to(torch.int32).contiguous(), "caption_ids": flat,
                   "caption_offsets": offsets}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "EncodedCorpus":
        t = load_file(str(path))
        flat, off = t["caption_ids"].tolist(), t["caption_offsets"].tolist()
        captions = [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]
        return cls(captions, t["codes"].long())


def encode_corpus(dataset, text_tok, vq, batch: int = 512, progress: bool = True) -> EncodedCorpus:
    from engine.tokenizer.vqvae import images_to_tensor
    captions, codes = [], []
    bar = tqdm(range(0, len(dataset), batch), desc="encode corpus", disable=not progress,
               unit="batch")
    with torch.no_grad():
        for start in bar:
            items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            captions += [text_tok.encode(x.caption) for x in items]
            codes.append(vq.encode(images_to_tensor([x.image for x in items])).cpu())
    return EncodedCorpus(captions, torch.cat(codes))


def build_document(caption: list[int], codes, vocab: Vocab, train: TrainConfig, data: DataConfig,
                   rng: np.random.Generator) -> list[int]:
    """One training sequence: <bos> CM3(segments) <eos>."""
    image = [vocab.image_token(int(c)) for c in codes]
    segs = [image, caption] if rng.random() < data.image_first_prob else [caption, image]
    segs = drop_condition(segs, vocab, train.cfg_dropout, rng)
    body = cm3_transform(join_segments(segs, vocab), vocab, rng, train.max_spans)
    return [vocab.bos] + body + [vocab.eos]


def document_stream(corpus: EncodedCorpus, vocab: Vocab, train: TrainConfig, data: DataConfig,
                    seed: int) -> Iterator[list[int]]:
    rng = np.random.default_rng(seed)
    while True:
        i = int(rng.integers(len(corpus)))
        yield build_document(corpus.captions[i], corpus.codes[i].tolist(), vocab, train, data, rng)
