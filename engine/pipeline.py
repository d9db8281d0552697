"""The stages of one training run, in order; each is skipped when its output exists."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from engine import validation
from engine.config import EngineConfig
from engine.data.corpus import document_stream, encoded_corpus, load_dataset
from engine.distributed import DataParallel
from engine.run_artifacts import RunDir, build_classifier, build_text_tokenizer, build_vqvae
from engine.stop_request import StopRequests
from engine.tokenizer.vocab import Vocab

log = logging.getLogger("engine.train")


def _stage(name: str):
    log.info("== %s", name)
    return time.time()


def initial_model(cfg: EngineConfig, vocab_size: int):
    """The run's freshly initialised model. Seeded here, so that its weights depend on the seed
    alone: the earlier stages draw from the global RNG when they train and not when they are
    loaded, so without this a run resumed before its first checkpoint started from other
    weights than a run that never stopped."""
    from engine.model import Transformer
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model, vocab_size)


def run_pipeline(cfg: EngineConfig, out: Path, device: str | None = None, resume: bool = False,
                 evaluate: bool = True, progress: bool = True,
                 dp: DataParallel = DataParallel()) -> dict:
    """Under data parallelism (engine/distributed.py) rank 0 builds every stage before the
    model while the other processes wait, then they load what it built; all of them train;
    rank 0 alone draws the samples and evaluates (the others return {})."""
    from engine.eval.report import write_loss_curve, write_samples_and_eval
    from engine.trainer import train_model

    run = RunDir(out)
    dev = dp.device(device)  # default: the GPU when there is one
    torch.manual_seed(cfg.train.seed)
    vocab = Vocab.from_config(cfg.vocab)
    timings = {}
    started = time.time()
    progress = progress and dp.main
    if not dp.main:
        dp.barrier()  # rank 0 builds the tokenizers, the corpus and the retrieval index first

    t = _stage("text tokenizer (BPE)")
    train_set = load_dataset(cfg.data.dataset, "train", cfg.image, cfg.data.train_size, cfg.train.seed)
    text = build_text_tokenizer(run, cfg, train_set)
    timings["bpe_s"] = time.time() - t

    t = _stage("image tokenizer (VQ-VAE)")
    vq = build_vqvae(run, cfg, train_set, progress=progress, device=dev).eval()
    timings["vqvae_s"] = time.time() - t

    t = _stage("evaluation judge (shape classifier)")
    classifier = build_classifier(run, cfg, progress=progress) if cfg.data.dataset == "shapes" else None
    timings["classifier_s"] = time.time() - t

    t = _stage("tokenised corpus")
    with StopRequests() as stop:   # Ctrl-C / SIGTERM: keep what is encoded, then stop
        corpus = encoded_corpus(run.corpus, train_set, text, vq, progress=progress, stop=stop)
    timings["corpus_s"] = time.time() - t

    neighbours = None
    if cfg.retrieval.enabled:
        from engine.retrieval.stage import build_retrieval
        t = _stage(f"retrieval: dual encoder, memory bank, {cfg.retrieval.k} neighbours per document")
        neighbours = build_retrieval(run.root, cfg, corpus, dev, text, vq, progress=progress)
        timings["retrieval_s"] = time.time() - t

    t = _stage("validation sets")
    val_sets = validation.build_sets(cfg, text, vq, run.root / "data" / "validation",
                                     progress=progress)
    timings["validation_sets_s"] = time.time() - t

    if dp.main:
        dp.barrier()

    where = f"{dp.world} processes ({dev.type})" if dp.active else str(dev)
    t = _stage(f"model: {cfg.preset}, {cfg.train.steps} steps on {where}")
    model = initial_model(cfg, vocab.size)
    log.info("%s parameters", f"{model.num_parameters():,}")
    metrics = train_model(model, lambda seed: document_stream(corpus, vocab, cfg.train, cfg.data, seed,
                                                              neighbours),
                          vocab, cfg.train, run.root, dev, resume=resume, progress=progress,
                          dp=dp, validation=validation.batches(
                              val_sets, vocab, cfg.model.max_seq_len, cfg.train.batch_size))
    timings["model_s"] = time.time() - t
    if not dp.main:
        return {}

    write_loss_curve(metrics, run.root / "loss.png")
    t = _stage("samples and evaluation")
    report = write_samples_and_eval(cfg, model, text, vq, classifier, run, evaluate=evaluate,
                                    progress=progress)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - started
    report["timings"] = timings
    report["final_loss"] = metrics[-1]["loss"] if metrics else None
    tmp = run.root / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run.root / "eval.json")
    log.info("run finished in %.0f s: %s", timings["total_s"], json.dumps(report))
    return report
