"""The memory bank at scale: build and query time of the approximate FAISS indexes, and their
recall@2 against exact inner-product search, on synthetic 256-d document embeddings.

  python bench/run.py --only retrieval_index --quick     100k vectors (IVF and HNSW)
  python bench/run.py --only retrieval_index             1M vectors (IVF; HNSW too with
                                                         BENCH_RETRIEVAL_HNSW=1: slow on 2 cores)

Synthetic vectors are clustered and of low intrinsic dimension (a 2,000-cluster mixture in 32
latent dimensions, lifted to 256 with a little noise, L2-normalised), as learned document
embeddings are; isotropic 256-d noise makes every neighbour nearly equidistant, which no
approximate index (and no real embedding) looks like.
Rows: "exact" (IndexFlatIP) is the reference; time_ms is the time per query of a batch
search of `queries` queries; extra holds build seconds, recall@2 against exact and memory.
The exact search over 1M vectors is the ground truth, so it is timed as well.
"""
from __future__ import annotations

import os
import time

import numpy as np

from bench.common import Row, device_name

DIM = 256
K = 2


def synthetic(n: int, dim: int = DIM, latent: int = 32, clusters: int = 2_000, seed: int = 0,
              spread: float = 0.5, noise: float = 0.05) -> np.ndarray:
    """Clustered points in a `latent`-dimensional space, linearly embedded in `dim` dims with a
    little isotropic noise, then L2-normalised: learned embeddings have a low effective rank."""
    rng = np.random.default_rng(0)          # the same clusters and embedding for every seed
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    lift = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        z = centres[rng.integers(clusters, size=e - s)]
        z += spread * rng.standard_normal((e - s, latent)).astype(np.float32)
        x = z @ lift + noise * rng.standard_normal((e - s, dim)).astype(np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def run(quick: bool) -> list[Row]:
    import faiss
    from engine.retrieval.memory_bank import MemoryBank, recall_at_k
    n = 100_000 if quick else 1_000_000
    n_queries = 1_000
    vectors = synthetic(n)
    queries = synthetic(n_queries, seed=12345)
    dev = device_name("cpu") + f", faiss {faiss.__version__} x{faiss.omp_get_max_threads()}"
    case = f"N={n:,} d={DIM} k={K} Q={n_queries}"

    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    build_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = exact.search(queries, K)
    exact_ms = (time.perf_counter() - t0) * 1e3 / n_queries
    rows = [Row("retrieval_index", case, "exact (flat IP)", exact_ms, 1.0,
                extra={"build_s": round(build_exact, 2), "recall@2": 1.0}, device=dev)]
    kinds = ["ivf", "hnsw"] if quick or os.environ.get("BENCH_RETRIEVAL_HNSW") else ["ivf"]
    for kind in kinds:
        bank = MemoryBank.build(vectors, kind=kind, recall_queries=200)
        # The speed/recall trade-off: the default probe budget, and a much smaller one.
        knob, default = ("nprobe", bank.index.nprobe) if kind == "ivf" else \
            ("efSearch", bank.index.hnsw.efSearch)
        for value in sorted({default, max(1, default // 16)}):
            if kind == "ivf":
                bank.index.nprobe = value
            else:
                bank.index.hnsw.efSearch = value
            t0 = time.perf_counter()
            _, got = bank.index.search(queries, K)
            ms = (time.perf_counter() - t0) * 1e3 / n_queries
            shape = {k: v for k, v in bank.info.items() if k in ("nlist", "M")}
            label = " ".join(f"{k}={v}" for k, v in {**shape, knob: value}.items())
            rows.append(Row("retrieval_index", case, f"{kind} {label}", ms, exact_ms / ms,
                            extra={"build_s": bank.info["build_s"],
                                   "recall@2": round(recall_at_k(got, truth), 4)}, device=dev))
        del bank
    return rows


if __name__ == "__main__":
    import sys
    from bench.run import format_table
    rows = run(quick="--quick" in sys.argv)
    print(format_table([r.as_dict() for r in rows]))
