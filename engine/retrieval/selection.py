"""The paper's rules for choosing k retrieved documents among a query's search candidates.

A candidate is skipped when it is
  - the query document itself (or a search miss, id -1);
  - a near-duplicate: its score against the query is above `threshold` (0.9 in the paper),
    because a near-copy teaches the model to copy rather than to use related context;
  - an exact duplicate of the query: the same image codes or the same caption ids;
  - an exact duplicate of a document already chosen (two copies add nothing).
Candidates are visited best score first and whole documents are taken, never parts; the
first k survivors are the neighbours. Everything is a pure function of its inputs, so a pass
is deterministic for a seed (the seed only enters through the query dropout).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

MISSING = -1


def content_key(values) -> int:
    """A stable 63-bit key of an id sequence (caption ids or image codes): equal sequences give
    equal keys, in every process (unlike Python's salted hash of bytes)."""
    data = np.asarray(values, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def caption_keys(captions: Sequence[Sequence[int]]) -> np.ndarray:
    return np.array([content_key(c) for c in captions], dtype=np.int64)


def image_keys(codes: torch.Tensor) -> np.ndarray:
    arr = torch.as_tensor(codes).to(torch.int64).numpy()
    return np.array([content_key(row) for row in arr], dtype=np.int64)


def select_neighbours(cand_ids: np.ndarray, cand_scores: np.ndarray, k: int, threshold: float,
                      cap_keys: np.ndarray, img_keys: np.ndarray, query: int | None = None,
                      query_caption_key: int | None = None,
                      query_image_key: int | None = None) -> list[int]:
    """cand_ids/cand_scores: one query's search results (any order); cap_keys/img_keys: per
    corpus document. `query` is the query's own document id when it is in the corpus (its
    keys are then read from the tables); an outside query (a prompt) passes its keys, if any."""
    if query is not None:
        query_caption_key = int(cap_keys[query])
        query_image_key = int(img_keys[query])
    cand_ids = np.asarray(cand_ids)
    cand_scores = np.asarray(cand_scores, dtype=np.float64)
    # The cheap rules first, vectorised: with a collapsed or over-confident encoder thousands
    # of candidates sit above the threshold, and a Python loop over them dominated a pass.
    ok = (cand_ids != MISSING) & np.isfinite(cand_scores) & (cand_scores <= threshold)
    if query is not None:
        ok &= cand_ids != query
    cand_ids, cand_scores = cand_ids[ok], cand_scores[ok]
    order = np.argsort(-cand_scores, kind="stable")
    chosen: list[int] = []
    seen_caps = {query_caption_key} - {None}
    seen_imgs = {query_image_key} - {None}
    for j in order:
        doc = int(cand_ids[j])
        ck, ik = int(cap_keys[doc]), int(img_keys[doc])
        if ck in seen_caps or ik in seen_imgs:
            continue
        chosen.append(doc)
        seen_caps.add(ck)
        seen_imgs.add(ik)
        if len(chosen) == k:
            break
    return chosen


def as_row(chosen: list[int], k: int) -> np.ndarray:
    """A fixed-width neighbours row: the chosen ids, then MISSING."""
    row = np.full(k, MISSING, dtype=np.int64)
    row[:len(chosen)] = chosen
    return row
