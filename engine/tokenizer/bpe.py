"""Byte-level BPE for the text side (Hugging Face `tokenizers`), placed into the mixed vocab.

Byte-level, without prefix spaces or normalisation, so decode(encode(s)) == s for every
string. BPE ids are shifted by `vocab.bpe_start`; specials and sentinels live below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.tokenizer.vocab import Vocab


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, vocab: Vocab):
        size = tokenizer.get_vocab_size()
        if size > vocab.bpe_size:
            raise ValueError(f"BPE has {size} tokens but the vocab layout has room for {vocab.bpe_size}")
        self.tok, self.vocab = tokenizer, vocab

    @classmethod
    def train(cls, texts: Iterable[str], vocab: Vocab) -> "TextTokenizer":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab.bpe_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, vocab)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path, vocab: Vocab) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), vocab)

    def encode(self, text: str) -> list[int]:
        off = self.vocab.bpe_start
        return [i + off for i in self.tok.encode(text).ids]

    def decode(self, ids: Iterable[int]) -> str:
        off = self.vocab.bpe_start
        return self.tok.decode([i - off for i in ids], skip_special_tokens=False)
