"""Online retrieval: neighbours computed on demand, for prompts at inference and small corpora.

A `Retriever` holds a run's dual encoder, memory bank and tokenised corpus. A prompt is a
text-only (or image-only, or both) document, so its query is the embedding of what it has,
with no token dropout (dropout is a training-time guard against near-copies). The same
selection rules as training apply, so a model sees neighbours at generation like the ones it
was trained with: never a near-duplicate above the threshold, never a document with the
prompt's exact caption.

`prefix_ids` lays the chosen documents out exactly as engine.data.corpus does in training;
a text-to-image prompt is then  <bos> prefix caption <break>  and the image follows.
`online_neighbours` is the offline pass in memory (one shard), for corpora small enough not to
bother with files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.config import RetrievalConfig
from engine.data.cm3 import join_segments
from engine.data.corpus import EncodedCorpus, retrieved_segments
from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.memory_bank import MemoryBank
from engine.retrieval.offline import neighbours_for, retrieve_shard
from engine.retrieval.selection import MISSING, caption_keys, content_key, image_keys
from engine.tokenizer.vocab import Vocab


class Retriever:
    def __init__(self, encoder: DualEncoder, bank: MemoryBank, corpus: EncodedCorpus,
                 cfg: RetrievalConfig, vocab: Vocab):
        if len(bank) != len(corpus):
            raise ValueError(f"the memory bank holds {len(bank)} documents, the corpus {len(corpus)}")
        self.encoder, self.bank, self.corpus, self.cfg, self.vocab = encoder.eval(), bank, corpus, cfg, vocab
        self.cap_keys = caption_keys(corpus.captions)
        self.img_keys = image_keys(corpus.codes)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Retriever":
        from engine.retrieval.stage import RetrievalDir
        from engine.run_artifacts import RunDir
        run = RunDir(run_dir)
        cfg = run.load_config()
        rd = RetrievalDir(run.root)
        if not rd.encoder.is_file():
            raise FileNotFoundError(f"{run.root} has no retrieval index ({rd.encoder} is missing): "
                                    "train it with python -m engine.train --retrieve 2, or drop --retrieve")
        if not run.corpus.is_file():
            raise FileNotFoundError(f"{run.corpus} is missing: the run's corpus stage never finished")
        return cls(DualEncoder.load(rd.encoder), MemoryBank.load(rd.bank), EncodedCorpus.load(run.corpus),
                   cfg.retrieval, Vocab.from_config(cfg.vocab))

    def search(self, captions: list[list[int]] | None = None, codes: torch.Tensor | None = None,
               k: int | None = None) -> list[list[int]]:
        """Neighbour document ids for outside queries (prompts): one list per query, best
        first, up to k long (k defaults to the run's)."""
        k = self.cfg.k if k is None else k
        if k <= 0:
            n = len(captions) if captions is not None else len(codes)
            return [[] for _ in range(n)]
        q = self.encoder.encode_documents(captions, codes).numpy()
        keys = [(content_key(captions[i]) if captions is not None else None,
                 content_key(codes[i]) if codes is not None else None) for i in range(len(q))]
        rows, _ = neighbours_for(q, self.bank, k, self.cfg.dedup_threshold, self.cap_keys,
                                 self.img_keys, [None] * len(q), self.cfg.candidates, keys)
        return [[int(d) for d in row if d != MISSING] for row in rows]

    def documents(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        return [(self.corpus.captions[i], self.corpus.codes[i].tolist()) for i in ids]

    def prefix_ids(self, ids: list[int], image_first: bool = False) -> list[int]:
        """The ids between <bos> and the query document: the retrieved documents, then the
        <break> that opens the query (empty without neighbours)."""
        if not ids:
            return []
        segs = retrieved_segments(self.documents(ids), self.vocab, image_first)
        return join_segments(segs, self.vocab) + [self.vocab.brk]


def online_neighbours(encoder: DualEncoder, bank: MemoryBank, corpus: EncodedCorpus,
                      cfg: RetrievalConfig, seed: int) -> np.ndarray:
    """[N, k] neighbours of every corpus document, in memory (the offline pass as one shard)."""
    rows, _ = retrieve_shard(0, 1, encoder, bank, corpus.captions, corpus.codes,
                             caption_keys(corpus.captions), image_keys(corpus.codes), cfg.k,
                             cfg.dedup_threshold, cfg.query_dropout, cfg.candidates, seed)
    return rows
