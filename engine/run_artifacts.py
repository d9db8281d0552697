"""What a run directory holds besides checkpoints, and how each piece is built or loaded.

RUN/config.json                     the EngineConfig
RUN/tokenizer/bpe.json              byte-level BPE (Hugging Face tokenizers JSON)
RUN/tokenizer/vqvae.safetensors     the VQ-VAE image tokenizer
RUN/tokenizer/vqvae.training.pt     its training state while it trains (engine/tokenizer/vq_state.py)
RUN/eval/shape_classifier.safetensors  the shape judge used by the evaluation
RUN/data/train.safetensors          the tokenised training corpus
RUN/data/validation/*.safetensors   the validation sets (engine/validation.py)
RUN/checkpoints/step_*/             model + optimizer (engine.checkpoint)
RUN/metrics.jsonl, RUN/loss.png, RUN/samples/*.png, RUN/eval.json
Each stage is skipped when its file exists, so --resume never redoes finished work.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.checkpoint import latest_checkpoint, load_model_weights
from engine.config import EngineConfig
from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.document import DocumentTokenizer
from engine.tokenizer.vocab import Vocab

log = logging.getLogger("engine.run")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    bpe = property(lambda self: self.root / "tokenizer" / "bpe.json")
    vqvae = property(lambda self: self.root / "tokenizer" / "vqvae.safetensors")
    vqvae_training = property(lambda self: self.root / "tokenizer" / "vqvae.training.pt")
    classifier = property(lambda self: self.root / "eval" / "shape_classifier.safetensors")
    corpus = property(lambda self: self.root / "data" / "train.safetensors")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    samples = property(lambda self: self.root / "samples")

    def load_config(self) -> EngineConfig:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.root} is not a run directory (no config.json): "
                                    "pass the --out folder of a python -m engine.train run")
        return EngineConfig.load(self.config)


def build_text_tokenizer(run: RunDir, cfg: EngineConfig, dataset) -> TextTokenizer:
    vocab = Vocab.from_config(cfg.vocab)
    if run.bpe.is_file():
        return TextTokenizer.load(run.bpe, vocab)
    n = min(cfg.data.bpe_corpus_size, len(dataset))
    tok = TextTokenizer.train((dataset[i].caption for i in range(n)), vocab)
    run.bpe.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.bpe.with_suffix(".tmp")
    tok.save(tmp)
    tmp.replace(run.bpe)
    return tok


def build_vqvae(run: RunDir, cfg: EngineConfig, dataset, progress: bool = True,
                device: str | torch.device = "cpu"):
    """The run's VQ-VAE on `device`: trained there (the pipeline passes its device, so a GPU
    machine trains and uses its image tokenizer on the GPU), or loaded when it exists.
    Ctrl-C / SIGTERM stops its training at the end of a step with its state saved, and the
    next build (--resume) continues from there, as does one after a crash (state saved every
    few minutes)."""
    from engine.stop_request import StopRequests, TrainingStopped
    from engine.tokenizer.vq_train import train_vqvae
    from engine.tokenizer.vqvae import VQVAE
    if run.vqvae.is_file():
        return VQVAE.load(run.vqvae, cfg.image, cfg.vocab.image_codes).to(device)
    t0 = time.time()
    with StopRequests() as stop:
        vq = train_vqvae(cfg.image, cfg.vocab.image_codes, dataset, seed=cfg.train.seed,
                         progress=progress, device=device, state_path=run.vqvae_training,
                         stop=stop)
    run.vqvae.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.vqvae.with_suffix(".tmp")
    vq.save(tmp)
    tmp.replace(run.vqvae)
    run.vqvae_training.unlink(missing_ok=True)  # only once the tokenizer itself is on disk
    if stop.reason is not None:  # asked for during the last step: the tokenizer is kept, then stop
        raise TrainingStopped(cfg.image.train_steps, stop.reason, stage="VQ-VAE")
    log.info("VQ-VAE trained in %.0f s", time.time() - t0)
    return vq


def build_classifier(run: RunDir, cfg: EngineConfig, progress: bool = True):
    from engine.eval.shape_classifier import ShapeClassifier, train_shape_classifier
    if run.classifier.is_file():
        return ShapeClassifier.load(run.classifier)
    clf = train_shape_classifier(cfg.image.image_size, seed=cfg.train.seed, progress=progress)
    run.classifier.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.classifier.with_suffix(".tmp")
    clf.save(tmp)
    tmp.replace(run.classifier)
    return clf


def load_for_inference(run_dir: str | Path, device: str | torch.device = "cpu",
                       dtype: str | torch.dtype = "float32"):
    """(config, model in eval mode, DocumentTokenizer) from a finished or running run; the
    model holds the latest checkpoint's EMA weights where training kept them, in `dtype`
    ("float32" or "bfloat16": half the memory, and faster where the hardware has bf16; the
    KV cache follows the weights, the logits are fp32 either way)."""
    from engine.devices import check_device, inference_dtype
    from engine.model import Transformer
    from engine.tokenizer.vqvae import VQVAE
    check_device(device)
    dtype = inference_dtype(dtype)
    run = RunDir(run_dir)
    cfg = run.load_config()
    vocab = Vocab.from_config(cfg.vocab)
    for f in (run.bpe, run.vqvae):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: the run's tokenizer stage never finished; "
                                    f"run python -m engine.train --out {run.root} --resume")
    text = TextTokenizer.load(run.bpe, vocab)
    vq = VQVAE.load(run.vqvae, cfg.image, cfg.vocab.image_codes).eval()
    model = Transformer(cfg.model, vocab.size)
    load_model_weights(latest_checkpoint(run.root), model, averaged=True)
    model.to(device=device, dtype=dtype).eval()
    tok = DocumentTokenizer(vocab, text, vq, cfg.image.tokens_per_image)
    return cfg, model, tok

