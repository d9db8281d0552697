"""Instruction tuning (SFT): a pretrained run's model tuned on CM3Leon's four task kinds.

  python -m engine.train --sft-from runs/tiny --out runs/tiny-sft

The SFT run is a run directory of its own (engine/run_artifacts.py): it holds a copy of the
source run's tokenizers and shape judge, so Engine.from_run, engine.generate and the
evaluations take it like any run; its config's `sft` section names the source and the task
mix, its `train` section the tuning schedule (engine.config.sft_schedule unless --steps /
--set say otherwise). Stages: the instruction set (pictures, their edits, VQ codes; built in
seconds, so not stored) -> the model, from the source's latest (averaged) weights -> the
loss curve, an edit grid and the instruction evaluation of the tuned model against the
source's, in eval.json.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from engine.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights
from engine.config import EngineConfig, sft_schedule
from engine.distributed import DataParallel
from engine.run_artifacts import RunDir

log = logging.getLogger("engine.train")


def sft_config(source: Path) -> EngineConfig:
    """The config an SFT run of `source` starts from (before --steps / --set)."""
    src = RunDir(source)
    cfg = src.load_config()              # a clear error when source is not a run
    latest_checkpoint(src.root)          # ... or has no trained model yet
    if cfg.sft.source_run:
        log.info("%s is itself instruction-tuned (from %s): tuning it further", source,
                 cfg.sft.source_run)
    cfg.train = sft_schedule(cfg.train)
    cfg.sft.source_run = str(Path(source).resolve())   # found again from any directory
    return cfg


def copy_source_artifacts(cfg: EngineConfig, out: Path) -> None:
    """The tokenizers and the shape judge, copied so the SFT run stands on its own."""
    src, run = RunDir(cfg.sft.source_run), RunDir(out)
    for a, b in ((src.bpe, run.bpe), (src.vqvae, run.vqvae), (src.classifier, run.classifier)):
        if b.is_file():
            continue
        if not a.is_file():
            if a == src.classifier:
                continue                 # only shapes runs have one; the evaluation then skips
            raise FileNotFoundError(f"{a} is missing: {src.root} is not a finished run")
        b.parent.mkdir(parents=True, exist_ok=True)
        tmp = b.with_name(b.name + ".tmp")
        shutil.copyfile(a, tmp)
        tmp.replace(b)


def run_instruction_tuning(cfg: EngineConfig, out: Path, device: str | None = None,
                           resume: bool = False, evaluate: bool = True,
                           progress: bool = True, dp: DataParallel = DataParallel()) -> dict:
    """Under data parallelism rank 0 copies the source's artifacts while the others wait;
    every process builds the same instruction set and tunes its share of each batch; rank 0
    alone evaluates (the others return {})."""
    from engine.data.corpus import load_dataset
    from engine.data.instructions import (build_instruction_set, instruction_stream,
                                          prompt_context)
    from engine.eval.report import write_loss_curve
    from engine.inference import Engine
    from engine.model import Transformer
    from engine.tokenizer.bpe import TextTokenizer
    from engine.tokenizer.document import DocumentTokenizer
    from engine.tokenizer.vocab import Vocab
    from engine.tokenizer.vqvae import VQVAE
    from engine.trainer import train_model

    if cfg.data.dataset != "shapes":
        raise ValueError(f"instruction tuning builds its tasks from the shapes dataset's "
                         f"layouts; the source run trained on {cfg.data.dataset!r}")
    if dp.main:
        copy_source_artifacts(cfg, out)
    dp.barrier()
    progress = progress and dp.main
    run = RunDir(out)
    dev = dp.device(device)  # default: the GPU when there is one
    torch.manual_seed(cfg.train.seed)
    vocab = Vocab.from_config(cfg.vocab)
    text = TextTokenizer.load(run.bpe, vocab)
    vq = VQVAE.load(run.vqvae, cfg.image, cfg.vocab.image_codes).eval()
    timings, started = {}, time.time()

    log.info("== instruction set: %d pictures", cfg.sft.examples)
    # Fresh pictures of the training split (so never a held-out pair), drawn with another
    # seed than the pretraining corpus's.
    pictures = load_dataset(cfg.data.dataset, "train", cfg.image, cfg.sft.examples,
                            cfg.train.seed + 1)
    data = build_instruction_set(pictures, text, vq, cfg.train.seed, progress=progress)
    timings["instructions_s"] = time.time() - started

    t = time.time()
    log.info("== model: instruction tuning for %d steps on %s, from %s", cfg.train.steps, dev,
             cfg.sft.source_run)
    model = Transformer(cfg.model, vocab.size)
    if not (resume and list_checkpoints(run.root)):
        load_model_weights(latest_checkpoint(Path(cfg.sft.source_run)), model, averaged=True)
    metrics = train_model(
        model, lambda seed: instruction_stream(data, text, vocab, cfg.sft, cfg.train.cfg_dropout, seed),
        vocab, cfg.train, run.root, dev, resume=resume, progress=progress,
        context_only=prompt_context, dp=dp)
    timings["model_s"] = time.time() - t
    if not dp.main:
        return {}
    write_loss_curve(metrics, run.root / "loss.png")

    report: dict = {"source_run": cfg.sft.source_run}
    if evaluate and run.classifier.is_file():
        t = time.time()
        log.info("== instruction evaluation: the tuned model against the source's")
        report.update(evaluate_against_source(cfg, run, Engine(
            model, DocumentTokenizer(vocab, text, vq, cfg.image.tokens_per_image),
            cfg.image.image_size), device=str(dev)))
        timings["eval_s"] = time.time() - t
    report["timings"] = {**timings, "total_s": time.time() - started}
    report["final_loss"] = metrics[-1]["loss"] if metrics else None
    tmp = run.root / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run.root / "eval.json")
    log.info("instruction tuning finished in %.0f s: %s", report["timings"]["total_s"],
             json.dumps({k: v for k, v in report.items() if k != "timings"}))
    return report


def evaluate_against_source(cfg: EngineConfig, run: RunDir, engine, device: str) -> dict:
    from engine.eval.instruction_eval import evaluate_instructions, save_edit_grid
    from engine.eval.shape_classifier import ShapeClassifier
    from engine.inference import Engine
    judge = ShapeClassifier.load(run.classifier)
    args = (cfg.image.image_size, 128, cfg.train.seed)
    tuned, samples = evaluate_instructions(engine, judge, *args)
    source, _ = evaluate_instructions(Engine.from_run(cfg.sft.source_run, device), judge, *args)
    run.samples.mkdir(parents=True, exist_ok=True)
    save_edit_grid(samples, run.samples / "edits.png")
    return {"instructions": tuned, "source_instructions": source,
            "samples": str(run.samples / "edits.png")}
