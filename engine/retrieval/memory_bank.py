"""The memory bank: document embeddings in a FAISS index, searched by maximum inner product.

Index kinds: "flat" is exact inner product (the default, and what "auto" picks up to
`exact_max` vectors); "ivf" (IndexIVFFlat, nlist ~ 4 sqrt(N), trained on a sample) and "hnsw"
(IndexHNSWFlat, M = 32) are approximate, chosen by "auto" above exact_max (IVF: it builds an
order of magnitude faster than HNSW on few cores). An approximate bank measures its own
recall@k against exact search on a sample of its vectors when built, and keeps the number.

On disk: the index in FAISS's own format (faiss.write_index; never pickle) and beside it the
document ids (.npy, int64) and a small JSON with the kind and measured recall.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("engine.retrieval")

KINDS = ("auto", "flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("retrieval needs FAISS: pip install faiss-cpu") from exc
    return faiss


def choose_kind(kind: str, n: int, exact_max: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n <= exact_max else "ivf"


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 4096):
    """Exact (scores, rows) of the k largest inner products, blockwise to bound memory."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Share of the exact top-k found in the approximate top-k (per query, then averaged)."""
    k = exact_rows.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) / k for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits))


@dataclass
class MemoryBank:
    index: object                         # a faiss.Index
    ids: np.ndarray                       # [N] int64: the document id of each index row
    kind: str = "flat"
    info: dict = field(default_factory=dict)   # build time, measured recall, parameters

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray | None = None, kind: str = "auto",
              exact_max: int = 200_000, seed: int = 0, nprobe: int | None = None,
              recall_k: int = 2, recall_queries: int = 1000) -> "MemoryBank":
        """vectors [N, d] (L2-normalised document embeddings, float32)."""
        import time
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"a memory bank needs [N, d] vectors with N >= 1, got {vectors.shape}")
        n, d = vectors.shape
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise ValueError(f"{n} vectors but ids of shape {ids.shape}")
        kind = choose_kind(kind, n, exact_max)
        t0 = time.perf_counter()
        info: dict = {"n": n, "dim": d}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))   # FAISS wants >= 39 per list
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
            index.cp.seed = seed
            index.train(sample)
            # ~3% of the lists: recall@2 >= 0.9 on clustered embeddings (bench/retrieval_index.py)
            index.nprobe = nprobe or max(1, min(nlist, max(16, nlist // 32)))
            info.update(nlist=nlist, nprobe=int(index.nprobe))
        else:
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 128
            info.update(M=32, efConstruction=80, efSearch=128)
        index.add(vectors)
        info["build_s"] = round(time.perf_counter() - t0, 3)
        bank = cls(index, ids, kind, info)
        if kind != "flat":
            rng = np.random.default_rng(seed + 1)
            q = vectors[rng.choice(n, size=min(n, recall_queries), replace=False)]
            k = min(recall_k, n)
            bank.info[f"recall@{k}"] = round(recall_at_k(index.search(q, k)[1],
                                                         exact_topk(vectors, q, k)[1]), 4)
            log.info("memory bank: %s over %d vectors, recall@%d %.3f vs exact", kind, n, k,
                     bank.info[f"recall@{k}"])
        return bank

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], document ids [Q, k]); id -1 (score -inf) where fewer exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the bank {self.dim}")
        k = max(1, min(k, len(self)))
        scores, rows = self.index.search(queries, k)
        doc = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32), doc.astype(np.int64)

    # -- files -------------------------------------------------------------------------------
    @staticmethod
    def paths(prefix: str | Path) -> tuple[Path, Path, Path]:
        prefix = Path(prefix)
        return (prefix.with_suffix(".faiss"), prefix.with_name(prefix.name + "_ids.npy"),
                prefix.with_suffix(".json"))

    def save(self, prefix: str | Path) -> None:
        faiss = _faiss()
        index_path, ids_path, info_path = self.paths(prefix)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        for final, write in ((ids_path, lambda p: np.save(p, self.ids)),
                             (info_path, lambda p: p.write_text(json.dumps(
                                 {"kind": self.kind, **self.info}, indent=2) + "\n")),
                             (index_path, lambda p: faiss.write_index(self.index, str(p)))):
            tmp = final.with_name(final.stem + ".tmp" + final.suffix)
            write(tmp)
            tmp.replace(final)

    @classmethod
    def load(cls, prefix: str | Path) -> "MemoryBank":
        faiss = _faiss()
        index_path, ids_path, info_path = cls.paths(prefix)
        for p in (index_path, ids_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing: the run's retrieval stage never finished")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        ids = np.load(ids_path, allow_pickle=False)
        index = faiss.read_index(str(index_path))
        if index.ntotal != len(ids):
            raise ValueError(f"{index_path} holds {index.ntotal} vectors but {ids_path} {len(ids)} ids")
        return cls(index, ids, info.pop("kind", "flat"), info)
