"""Tokenised image-caption corpora on disk, and the stream of training documents.

An EncodedCorpus is what a large run would shard: per document the caption's BPE ids and the
image's VQ codes, stored as flat safetensors arrays (codes [N, T], caption ids flattened with
offsets), so loading is a memory map, not a pickle. `document_stream` turns it into an endless
stream of training sequences: modality order, CFG condition dropout, then the CM3 transform.

Retrieval-augmented documents (engine/retrieval; `neighbours` given): the k retrieved
documents come first, each as its own segments (in the query's modality order) closed by an
<eos> segment, then the query document; the whole body goes through the CM3 transform, so
spans may fall in retrieved documents too but never cross a <break>, and so never a document
boundary. With caption-first documents R1, R2 and query Q:

    <bos> R1.cap <break> R1.img <break> <eos> <break> R2.cap <break> R2.img <break> <eos>
          <break> Q.cap <break> Q.img <eos>                         (before the CM3 transform)

The <eos> segment is what tells the model that a document ended (a <break> alone also
separates a caption from its image); it holds no BPE or image id, so CM3 never masks it.
CFG condition dropout drops the retrieved documents together with the query's caption: the
unconditional form stays "<bos> <mask> <break> image <eos>", the row CFG sampling uses. A
missing neighbour (id -1: fewer than k survived the selection rules) is left out. A
caption-only document (data.caption_only_prob) takes no neighbours. Without neighbours and
with caption_only_prob 0, every function here is byte-for-byte what it was before either,
RNG draws included.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.config import DataConfig, ImageConfig, TrainConfig
from engine.data.cm3 import cm3_transform, drop_condition, join_segments
from engine.stop_request import TrainingStopped
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


# With a parts folder, encode_corpus writes what it has encoded at least this often, so a
# crash loses at most this much of a long encoding.
PART_EVERY_S = 600.0


def encode_corpus(dataset, text_tok, vq, batch: int = 128, progress: bool = True,
                  parts: Path | None = None, stop=None) -> EncodedCorpus:
    """Captions through the BPE, images through the VQ-VAE encoder, `batch` items at a time.

    The encoder codes each image on its own, so `batch` changes the speed, never the codes.
    That is what makes `parts` safe: given a folder, the items encoded so far are written
    there as numbered parts every PART_EVERY_S seconds and when anything stops the loop, and a
    later call with the same folder starts after the last part, ending with the corpus an
    uninterrupted call makes. `stop` (an engine.stop_request.StopRequests) turns Ctrl-C and
    SIGTERM into a stop after the batch in hand: its part is saved, then TrainingStopped."""
    from engine.tokenizer.vqvae import images_to_tensor
    done = _load_parts(parts, len(dataset)) if parts is not None else []
    captions = [c for part in done for c in part.captions]
    codes = [part.codes for part in done]
    start = len(captions)
    pending, pending_batches = start, len(codes)   # the first item and batch not in a part
    saved_at = time.time()

    def save_part():
        nonlocal pending, pending_batches, saved_at
        if parts is not None and len(captions) > pending:
            parts.mkdir(parents=True, exist_ok=True)
            EncodedCorpus(captions[pending:], torch.cat(codes[pending_batches:])).save(
                parts / f"{pending:012d}.safetensors")
            pending, pending_batches, saved_at = len(captions), len(codes), time.time()

    bar = tqdm(total=len(dataset), initial=start, desc="encode corpus", disable=not progress,
               unit="item")
    try:
        with torch.no_grad():
            for first in range(start, len(dataset), batch):
                items = [dataset[i] for i in range(first, min(first + batch, len(dataset)))]
                captions += [text_tok.encode(x.caption) for x in items]
                codes.append(vq.encode(images_to_tensor([x.image for x in items])).cpu())
                bar.update(len(items))
                if stop is not None and stop.reason is not None:
                    save_part()
                    raise TrainingStopped(len(captions), stop.reason, stage="corpus encoding",
                                          unit="item")
                if time.time() - saved_at >= PART_EVERY_S:
                    save_part()
    except BaseException:
        save_part()   # whatever stopped it, the finished batches are kept
        raise
    finally:
        bar.close()
    return EncodedCorpus(captions, torch.cat(codes))


def _load_parts(parts: Path, total: int) -> list[EncodedCorpus]:
    """The parts an interrupted encode_corpus left, in order; each starts where the one
    before it ended."""
    if not parts.is_dir():
        return []
    loaded, expected = [], 0
    for path in sorted(parts.glob("*.safetensors")):
        if int(path.stem) != expected:
            raise ValueError(f"{parts}: part {path.name} should start at item {expected}; "
                             f"delete the folder to encode the corpus from the start")
        loaded.append(EncodedCorpus.load(path))
        expected += len(loaded[-1])
    if expected > total:
        raise ValueError(f"{parts} holds {expected} items but the dataset has {total}: it is "
                         f"another corpus's; delete the folder")
    return loaded


def encoded_corpus(path: Path, dataset, text_tok, vq, progress: bool = True,
                   stop=None) -> EncodedCorpus:
    """`dataset` tokenised: loaded from `path` when a run already encoded it there, else
    encoded (encode_corpus) and saved there. The encoding keeps its progress in
    `path`.parts/ until it is whole, so a run stopped or crashed mid-way continues it."""
    if path.is_file():
        return EncodedCorpus.load(path)
    parts = path.with_name(path.name + ".parts")
    corpus = encode_corpus(dataset, text_tok, vq, progress=progress, parts=parts, stop=stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus.save(path)
    shutil.rmtree(parts, ignore_errors=True)
    return corpus


def build_document(caption: list[int], codes, vocab: Vocab, train: TrainConfig, data: DataConfig,
                   rng: np.random.Generator,
                   retrieved: list[tuple[list[int], list[int]]] | None = None) -> list[int]:
    """One training sequence: <bos> CM3(segments) <eos>; `retrieved` (caption ids, codes)
    documents are prepended as the module docstring lays out.

    With probability data.caption_only_prob the document is the caption alone: CM3 spans then
    all fall in the caption (infilling practice) and no image follows a holed caption. No
    draw is spent on it when the probability is 0, so such streams are as before."""
    if data.caption_only_prob > 0 and rng.random() < data.caption_only_prob:
        body = cm3_transform(list(caption), vocab, rng, train.max_spans, train.span_segments)
        return [vocab.bos] + body + [vocab.eos]
    image = [vocab.image_token(int(c)) for c in codes]
    image_first = rng.random() < data.image_first_prob
    segs = [image, caption] if image_first else [caption, image]
    dropped = drop_condition(segs, vocab, train.cfg_dropout, rng)
    if retrieved and dropped is segs:
        segs = retrieved_segments(retrieved, vocab, image_first) + segs
    else:
        segs = dropped
    body = cm3_transform(join_segments(segs, vocab), vocab, rng, train.max_spans,
                         train.span_segments)
    return [vocab.bos] + body + [vocab.eos]


def retrieved_segments(retrieved: list[tuple[list[int], list[int]]], vocab: Vocab,
                       image_first: bool = False) -> list[list[int]]:
    """Retrieved documents as segments, each closed by an <eos> segment (also the prompt
    prefix for retrieval at generation time)."""
    segs: list[list[int]] = []
    for cap, codes in retrieved:
        img = [vocab.image_token(int(c)) for c in codes]
        segs += ([img, list(cap)] if image_first else [list(cap), img]) + [[vocab.eos]]
    return segs


def document_stream(corpus: EncodedCorpus, vocab: Vocab, train: TrainConfig, data: DataConfig,
                    seed: int, neighbours: np.ndarray | None = None) -> Iterator[list[int]]:
    """Endless training sequences; `neighbours` [N, k] (document ids, -1 = none) switches on
    retrieval augmentation."""
    rng = np.random.default_rng(seed)
    if neighbours is not None and len(neighbours) != len(corpus):
        raise ValueError(f"neighbours cover {len(neighbours)} documents, the corpus {len(corpus)}")
    while True:
        i = int(rng.integers(len(corpus)))
        if neighbours is None:
            yield build_document(corpus.captions[i], corpus.codes[i].tolist(), vocab, train, data, rng)
            continue
        retrieved = [(corpus.captions[j], corpus.codes[j].tolist()) for j in neighbours[i] if j >= 0]
        yield build_document(corpus.captions[i], corpus.codes[i].tolist(), vocab, train, data, rng,
                             retrieved)
