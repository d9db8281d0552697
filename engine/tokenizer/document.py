"""Documents (text and image segments) <-> ids in the mixed vocabulary.

Sequence format: <bos> seg_0 <break> seg_1 <break> ... seg_n <eos>, where a text segment is
its BPE ids and an image segment is exactly tokens_per_image image-code ids (raster order).
Round trips: text exactly; images code-exactly (an ImageSegment keeps its codes; pixels go
through the VQ-VAE only when a segment has a picture and no codes yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from PIL import Image

from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.vocab import Vocab


@dataclass
class TextSegment:
    text: str


@dataclass
class ImageSegment:
    codes: tuple[int, ...] | None = None
    image: Image.Image | None = field(default=None, repr=False)


Segment = Union[TextSegment, ImageSegment]
Document = list[Segment]


class DocumentTokenizer:
    """Joins the text BPE and the VQ image tokenizer into one id space."""

    def __init__(self, vocab: Vocab, text: TextTokenizer, vq=None, tokens_per_image: int | None = None):
        self.vocab, self.text, self.vq = vocab, text, vq
        self.tokens_per_image = tokens_per_image

    # -- images ---------------------------------------------------------------------
    def image_codes(self, images: Sequence[Image.Image]) -> list[tuple[int, ...]]:
        if self.vq is None:
            raise ValueError("this tokenizer has no VQ-VAE: image segments need codes")
        from engine.tokenizer.vqvae import images_to_tensor
        with torch.no_grad():
            codes = self.vq.encode(images_to_tensor(list(images))).cpu()
        return [tuple(int(c) for c in row) for row in codes]

    def decode_images(self, codes: Sequence[Sequence[int]]) -> list[Image.Image]:
        if self.vq is None:
            raise ValueError("this tokenizer has no VQ-VAE to decode images")
        from engine.tokenizer.vqvae import tensor_to_images
        with torch.no_grad():
            return tensor_to_images(self.vq.decode(torch.as_tensor(list(codes), dtype=torch.long)))

    # -- documents ------------------------------------------------------------------
    def segment_ids(self, seg: Segment) -> list[int]:
        if isinstance(seg, TextSegment):
            return self.text.encode(seg.text)
        codes = seg.codes if seg.codes is not None else self.image_codes([seg.image])[0]
        if self.tokens_per_image is not None and len(codes) != self.tokens_per_image:
            raise ValueError(f"an image segment has {len(codes)} codes; expected {self.tokens_per_image}")
        if any(not 0 <= c < self.vocab.image_codes for c in codes):
            raise ValueError(f"image codes must lie in [0, {self.vocab.image_codes})")
        return [self.vocab.image_token(c) for c in codes]

    def encode(self, doc: Document, bos: bool = True, eos: bool = True) -> list[int]:
        if not doc:
            raise ValueError("an empty document has nothing to encode")
        ids = [self.vocab.bos] if bos else []
        for i, seg in enumerate(doc):
            if i:
                ids.append(self.vocab.brk)
            ids += self.segment_ids(seg)
        if eos:
            ids.append(self.vocab.eos)
        return ids

    def decode(self, ids: Sequence[int]) -> Document:
        """Ids -> segments. <bos>/<eos>/<pad> are dropped; other specials inside text are kept
        by name (e.g. "<mask>") so nothing silently disappears."""
        v = self.vocab
        names = v.special_names()
        segments: list[list[int]] = [[]]
        for t in ids:
            t = int(t)
            if t in (v.bos, v.eos, v.pad):
                continue
            if t == v.brk:
                segments.append([])
            else:
                segments[-1].append(t)
        doc: Document = []
        for seg in segments:
            if seg and all(v.is_image(t) for t in seg):
                doc.append(ImageSegment(codes=tuple(t - v.image_start for t in seg)))
            elif seg:
                doc.append(TextSegment(self._text(seg, names)))
        return doc

    def _text(self, ids: list[int], names: list[str]) -> str:
        out, run = [], []
        for t in ids:
            if t >= self.vocab.bpe_start and not self.vocab.is_image(t):
                run.append(t)
                continue
            if run:
                out.append(self.text.decode(run))
                run = []
            out.append(names[t] if t < len(names) else f"<img:{t - self.vocab.image_start}>")
        if run:
            out.append(self.text.decode(run))
        return "".join(out)
