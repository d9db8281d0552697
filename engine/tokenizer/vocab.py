"""The mixed vocabulary: one id space for specials, CM3 sentinels, BPE text and image codes.

Layout (ids ascending):  [specials | <mask:0..S-1> | BPE tokens | image codes]
Image codes sit at the top so that "is this an image id" is one comparison and the sampler's
`allowed` range for an image span is a single [start, end) interval.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import VocabConfig

SPECIALS = ("<pad>", "<bos>", "<eos>", "<break>", "<mask>")


@dataclass(frozen=True)
class Vocab:
    text_size: int
    image_codes: int
    num_sentinels: int

    @classmethod
    def from_config(cls, cfg: VocabConfig) -> "Vocab":
        v = cls(cfg.text_size, cfg.image_codes, cfg.num_sentinels)
        if v.bpe_size < 256 + 1:
            raise ValueError(f"vocab.text_size={cfg.text_size} leaves {v.bpe_size} BPE ids; "
                             "a byte-level BPE needs at least 257")
        return v

    pad = 0
    bos = 1
    eos = 2
    brk = 3       # <break>: between modalities
    mask = 4      # <mask>: a dropped condition (CFG) or an infilling placeholder

    @property
    def sentinel_start(self) -> int:
        return len(SPECIALS)

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.sentinel_start + i

    def is_sentinel(self, token: int) -> bool:
        return self.sentinel_start <= token < self.bpe_start

    @property
    def bpe_start(self) -> int:
        return self.sentinel_start + self.num_sentinels

    @property
    def bpe_size(self) -> int:
        return self.text_size - self.bpe_start

    @property
    def image_start(self) -> int:
        return self.text_size

    @property
    def size(self) -> int:
        return self.text_size + self.image_codes

    def is_image(self, token: int) -> bool:
        return token >= self.image_start

    def image_token(self, code: int) -> int:
        return self.image_start + code

    def special_names(self) -> list[str]:
        return list(SPECIALS) + [f"<mask:{i}>" for i in range(self.num_sentinels)]
