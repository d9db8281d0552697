"""Retrieval-augmented pretraining and generation (CM3Leon section 2.2).

dual_encoder.py      the text and image towers, document embeddings, the re-ranker score()
encoder_training.py  symmetric multi-positive InfoNCE
query.py             query formation: 20% of the tokens dropped
memory_bank.py       the FAISS bank (exact inner product; IVF / HNSW with measured recall)
selection.py         the paper's selection rules (self, > 0.9, exact duplicates, k whole docs)
offline.py           the sharded offline pass writing neighbour ids
online.py            on-demand retrieval for prompts and small corpora
generation.py        retrieved documents prepended to generation prompts
recall.py            caption -> image recall on held-out documents
stage.py             the training-run stage (RUN/retrieval/)
"""
from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.memory_bank import MemoryBank
from engine.retrieval.selection import select_neighbours

__all__ = ["DualEncoder", "MemoryBank", "select_neighbours"]
