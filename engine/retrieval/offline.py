"""The offline retrieval pass: neighbour ids for every training document, written in shards.

The corpus is cut into `shards` contiguous ranges, one per worker, as a billion-document
corpus would be processed: a worker needs only the encoder, the memory bank and its own range,
and writes RUN/retrieval/neighbours_SSSSS-of-TTTTT.npy ([n, k] int64, -1 where fewer than k
documents survive the rules) atomically; a finished shard is never redone. Here the workers
run one after another in-process (the machine has few cores and FAISS already uses them);
`retrieve_shard` is the unit a cluster job would run. manifest.json records the ranges and
what the rules did (neighbour scores, how often a row came back short).

A query is its document with 20% of its tokens dropped (engine.retrieval.query), from an RNG
seeded by (seed, shard), so a pass is deterministic for a seed. The search starts with
`candidates` results and widens fourfold for the queries still short of k after the rules
(in a corpus with many near-copies, the best 32 can all be above the 0.9 threshold).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.memory_bank import MemoryBank
from engine.retrieval.query import drop_caption, drop_codes
from engine.retrieval.selection import MISSING, as_row, select_neighbours

MAX_CANDIDATES = 4096


def shard_name(shard: int, shards: int) -> str:
    return f"neighbours_{shard:05d}-of-{shards:05d}.npy"


def shard_range(shard: int, shards: int, n: int) -> tuple[int, int]:
    return shard * n // shards, (shard + 1) * n // shards


def query_embeddings(encoder: DualEncoder, captions, codes: torch.Tensor, dropout: float,
                     rng: np.random.Generator) -> np.ndarray:
    caps = [drop_caption(c, dropout, rng) for c in captions]
    img = drop_codes(codes, dropout, encoder.image.dropped, rng)
    return encoder.encode_documents(caps, img).numpy()


def neighbours_for(queries: np.ndarray, bank: MemoryBank, k: int, threshold: float,
                   cap_keys: np.ndarray, img_keys: np.ndarray, query_docs: list[int | None],
                   candidates: int, query_keys: list[tuple[int | None, int | None]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids [Q, k], their scores [Q, k]) under the selection rules."""
    out = np.full((len(queries), k), MISSING, dtype=np.int64)
    scores = np.full((len(queries), k), np.nan, dtype=np.float32)
    todo = np.arange(len(queries))
    width = max(candidates, k + 1)
    while len(todo):
        s, ids = bank.search(queries[todo], min(width, len(bank)))
        short = []
        for row, q in enumerate(todo):
            ck, ik = query_keys[q] if query_keys is not None else (None, None)
            chosen = select_neighbours(ids[row], s[row], k, threshold, cap_keys, img_keys,
                                       query=query_docs[q], query_caption_key=ck,
                                       query_image_key=ik)
            out[q] = as_row(chosen, k)
            lookup = dict(zip(ids[row].tolist(), s[row].tolist()))
            scores[q, :len(chosen)] = [lookup[d] for d in chosen]
            if len(chosen) < k:
                short.append(q)
        if width >= min(MAX_CANDIDATES, len(bank)):
            break
        todo, width = np.array(short, dtype=np.int64), width * 4
    return out, scores


def retrieve_shard(shard: int, shards: int, encoder: DualEncoder, bank: MemoryBank, captions,
                   codes: torch.Tensor, cap_keys: np.ndarray, img_keys: np.ndarray, k: int,
                   threshold: float, dropout: float, candidates: int, seed: int,
                   batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = shard_range(shard, shards, len(captions))
    rng = np.random.default_rng([seed, shard])
    rows, scores = [], []
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        q = query_embeddings(encoder, captions[s:e], codes[s:e], dropout, rng)
        r, sc = neighbours_for(q, bank, k, threshold, cap_keys, img_keys, list(range(s, e)), candidates)
        rows.append(r)
        scores.append(sc)
    if not rows:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(rows), np.concatenate(scores)


def retrieval_pass(out_dir: str | Path, encoder: DualEncoder, bank: MemoryBank, captions,
                   codes: torch.Tensor, cap_keys: np.ndarray, img_keys: np.ndarray, k: int,
                   threshold: float, dropout: float, candidates: int, shards: int, seed: int,
                   progress: bool = True) -> dict:
    """Writes every missing shard and the manifest; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(captions)
    shards = max(1, min(shards, n))
    stats = []
    for shard in tqdm(range(shards), desc="retrieval pass", disable=not progress, unit="shard"):
        path = out_dir / shard_name(shard, shards)
        if path.is_file():
            continue
        rows, scores = retrieve_shard(shard, shards, encoder, bank, captions, codes, cap_keys,
                                      img_keys, k, threshold, dropout, candidates, seed)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, rows)
        tmp.replace(path)
        stats.append((rows, scores))
    manifest = {"documents": n, "k": k, "shards": shards, "threshold": threshold,
                "query_dropout": dropout, "seed": seed,
                "ranges": [shard_range(s, shards, n) for s in range(shards)],
                "files": [shard_name(s, shards) for s in range(shards)]}
    if stats:
        rows = np.concatenate([r for r, _ in stats])
        scores = np.concatenate([s for _, s in stats])
        manifest["full_rows"] = round(float((rows != MISSING).all(1).mean()), 4)
        manifest["neighbour_score_mean"] = round(float(np.nanmean(scores)), 4)
        manifest["neighbour_score_max"] = round(float(np.nanmax(scores)), 4)
    old = out_dir / "manifest.json"
    if old.is_file() and not stats:
        return json.loads(old.read_text())
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(old)
    return manifest


def load_neighbours(out_dir: str | Path, n: int) -> np.ndarray:
    """All shards of a finished pass, concatenated: [n, k] int64."""
    out_dir = Path(out_dir)
    mpath = out_dir / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} is missing: the retrieval pass never finished")
    m = json.loads(mpath.read_text())
    if m["documents"] != n:
        raise ValueError(f"{out_dir} holds neighbours for {m['documents']} documents, the corpus "
                         f"has {n}: delete {out_dir} to redo the retrieval stage")
    parts = []
    for name in m["files"]:
        p = out_dir / name
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: rerun with --resume to finish the pass")
        parts.append(np.load(p, allow_pickle=False))
    rows = np.concatenate(parts)
    if rows.shape != (n, m["k"]):
        raise ValueError(f"neighbour shards in {out_dir} have shape {rows.shape}, expected {(n, m['k'])}")
    return rows
