"""The retrieval stage of a training run (engine.pipeline), before the model.

RUN/retrieval/dual_encoder.safetensors   the dual encoder (trained here)
RUN/retrieval/recall.json                its caption -> image recall on held-out documents
RUN/retrieval/bank.faiss, bank_ids.npy, bank.json   the memory bank over the training corpus
RUN/retrieval/neighbours_*.npy, manifest.json       the offline pass, one shard per worker
RUN/retrieval/lengths.json               augmented document lengths vs the context
Each piece is skipped when its file exists, like every other stage.

It ends with a length check: a retrieval-augmented document is ~(k + 1) times a plain one,
and the packer skips (never truncates) a document longer than model.max_seq_len, so a
context that is too short would silently train on almost nothing; that is an error here.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.encoder_training import train_dual_encoder
from engine.retrieval.memory_bank import MemoryBank
from engine.retrieval.offline import load_neighbours, retrieval_pass
from engine.retrieval.selection import caption_keys, image_keys

log = logging.getLogger("engine.retrieval")

MAX_SKIPPED = 0.01          # share of over-long documents the length check tolerates


class RetrievalDir:
    def __init__(self, run_root: str | Path):
        self.root = Path(run_root) / "retrieval"

    encoder = property(lambda self: self.root / "dual_encoder.safetensors")
    encoder_training = property(lambda self: self.root / "dual_encoder.training.pt")
    recall = property(lambda self: self.root / "recall.json")
    bank = property(lambda self: self.root / "bank")          # prefix: .faiss, _ids.npy, .json
    neighbours = property(lambda self: self.root)


def build_encoder(rd: RetrievalDir, cfg: EngineConfig, corpus, device, progress: bool) -> DualEncoder:
    """Loaded when the run has it, else trained. Ctrl-C / SIGTERM stops the training after a
    step with its state saved, and the next build (--resume) continues from there, as does one
    after a crash (state saved every few minutes)."""
    from engine.stop_request import StopRequests, TrainingStopped
    if rd.encoder.is_file():
        return DualEncoder.load(rd.encoder, device=device)
    with StopRequests() as stop:
        enc = train_dual_encoder(corpus.captions, corpus.codes, cfg.vocab.text_size,
                                 cfg.vocab.image_codes, cfg.image.grid, cfg.retrieval,
                                 seed=cfg.train.seed, device=device, progress=progress,
                                 state_path=rd.encoder_training, stop=stop)
    enc.save(rd.encoder)
    rd.encoder_training.unlink(missing_ok=True)   # only once the encoder itself is on disk
    if stop.reason is not None:   # asked for during the last step: the encoder is kept, then stop
        raise TrainingStopped(cfg.retrieval.encoder_steps, stop.reason, stage="dual encoder")
    return enc


def build_bank(rd: RetrievalDir, cfg: EngineConfig, encoder: DualEncoder, corpus) -> MemoryBank:
    if MemoryBank.paths(rd.bank)[0].is_file():
        return MemoryBank.load(rd.bank)
    vectors = encoder.encode_documents(corpus.captions, corpus.codes).numpy()
    bank = MemoryBank.build(vectors, kind=cfg.retrieval.index, exact_max=cfg.retrieval.exact_max,
                            seed=cfg.train.seed, recall_k=cfg.retrieval.k)
    bank.save(rd.bank)
    return bank


def check_lengths(corpus, neighbours: np.ndarray, cfg: EngineConfig, sample: int = 500) -> dict:
    """Builds `sample` augmented documents and measures how many the packer would skip."""
    from engine.data.corpus import document_stream
    from engine.tokenizer.vocab import Vocab
    stream = document_stream(corpus, Vocab.from_config(cfg.vocab), cfg.train, cfg.data,
                             seed=cfg.train.seed + 12345, neighbours=neighbours)
    lengths = np.array([len(next(stream)) for _ in range(sample)])
    over = float((lengths > cfg.model.max_seq_len).mean())
    stats = {"median_len": int(np.median(lengths)), "max_len": int(lengths.max()),
             "over_context": round(over, 4)}
    if over > MAX_SKIPPED:
        need = int(np.percentile(lengths, 99.9)) + 1
        raise ValueError(f"{over:.0%} of retrieval-augmented documents (median {stats['median_len']}"
                         f", max {stats['max_len']} tokens) exceed model.max_seq_len="
                         f"{cfg.model.max_seq_len}; the packer would skip them: pass "
                         f"--set model.max_seq_len={-(-need // 64) * 64}"
                         f" or a smaller retrieval.k")
    return stats


def build_retrieval(run_root: str | Path, cfg: EngineConfig, corpus, device="cpu", text_tok=None,
                    vq=None, progress: bool = True) -> np.ndarray:
    """Encoder -> bank -> offline pass -> neighbours [N, k]; with text_tok and vq on the shapes
    data, also the held-out recall report."""
    r = cfg.retrieval
    rd = RetrievalDir(run_root)
    timings = {}
    t = time.time()
    encoder = build_encoder(rd, cfg, corpus, device, progress).cpu()
    timings["encoder_s"] = round(time.time() - t, 1)
    if text_tok is not None and vq is not None and cfg.data.dataset == "shapes" and not rd.recall.is_file():
        from engine.data.corpus import load_dataset
        from engine.retrieval.recall import heldout_recall
        heldout = load_dataset("shapes", "heldout", cfg.image, 1000, cfg.train.seed)
        report = heldout_recall(encoder, heldout, text_tok, vq)
        rd.recall.write_text(json.dumps(report, indent=2) + "\n")
        log.info("dual encoder held-out recall: %s", json.dumps(report))
    t = time.time()
    bank = build_bank(rd, cfg, encoder, corpus)
    timings["bank_s"] = round(time.time() - t, 1)
    t = time.time()
    manifest = retrieval_pass(rd.neighbours, encoder, bank, corpus.captions, corpus.codes,
                              caption_keys(corpus.captions), image_keys(corpus.codes), r.k,
                              r.dedup_threshold, r.query_dropout, r.candidates, r.shards,
                              cfg.train.seed, progress=progress)
    timings["pass_s"] = round(time.time() - t, 1)
    neighbours = load_neighbours(rd.neighbours, len(corpus))
    full = float((neighbours >= 0).all(1).mean())
    if full < 0.5:
        log.warning("retrieval: only %.0f%% of documents got %d neighbours under the selection "
                    "rules (threshold %.2f): the encoder may be undertrained (raise "
                    "retrieval.encoder_steps) or the corpus mostly near-duplicates",
                    100 * full, r.k, r.dedup_threshold)
    lengths = check_lengths(corpus, neighbours, cfg)
    (rd.root / "lengths.json").write_text(json.dumps(lengths) + "\n")
    log.info("retrieval: %s; lengths %s; %s", json.dumps({k: v for k, v in manifest.items()
                                                          if k not in ("ranges", "files")}),
             lengths, timings)
    return neighbours
