"""How good is the VQ-VAE image tokenizer? PSNR, codebook usage, colour and shape kept.

    python -m engine.eval.vq_report                       # train the tiny VQ-VAE, report
    python -m engine.eval.vq_report --vq runs/vq.safetensors   # report on a saved one

PSNR is computed from the mean squared error over all evaluated pixels (not the mean of
per-image PSNRs, which the many near-blank images would inflate). Colour kept: the
reconstruction's dominant colour is the colour of the object (or of one of the two
objects). Shape kept: the classifier names the true shape of a single-shape image's
reconstruction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from engine.config import ImageConfig, get_preset
from engine.data.shapes import ShapesDataset
from engine.eval.colour import dominant_colour
from engine.eval.shape_classifier import ShapeClassifier, train_shape_classifier
from engine.tokenizer.vq_train import psnr_db, train_vqvae
from engine.tokenizer.vqvae import VQVAE, images_to_tensor, tensor_to_images


@torch.no_grad()
def evaluate_vq(vq: VQVAE, dataset, classifier: ShapeClassifier, n: int = 512) -> dict:
    n = min(n, len(dataset))
    examples = [dataset[i] for i in range(n)]
    x = images_to_tensor([e.image for e in examples])
    codes = torch.cat([vq.encode(chunk) for chunk in x.split(128)])
    recon = torch.cat([vq.decode(chunk) for chunk in codes.split(128)])
    # Score what a user gets back: an 8-bit image.
    recon_images = tensor_to_images(recon)
    recon = images_to_tensor(recon_images)
    mse = torch.mean((recon - x) ** 2).item()

    colour_ok = [dominant_colour(img) in {o[0] for o in e.objects}
                 for img, e in zip(recon_images, examples)]
    single = [k for k, e in enumerate(examples) if len(e.objects) == 1]
    preds = classifier.predict([recon_images[k] for k in single])
    shape_ok = [p == examples[k].objects[0][1] for p, k in zip(preds, single)]
    return {
        "psnr_db": round(psnr_db(mse), 2),
        "codebook_usage": round(codes.unique().numel() / vq.codebook_size, 4),
        "colour_kept": round(sum(colour_ok) / n, 4),
        "shape_kept": round(sum(shape_ok) / max(1, len(shape_ok)), 4),
        "images": n,
    }


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vq", help="load this VQ-VAE (safetensors) instead of training one")
    p.add_argument("--save", help="write the trained VQ-VAE here (safetensors)")
    p.add_argument("--classifier", help="load this shape classifier instead of training one")
    p.add_argument("--steps", type=int, help="VQ-VAE training steps (default: the preset's)")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("-n", type=int, default=512, help="heldout images to evaluate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _args(argv)
    cfg = get_preset(args.preset)
    icfg: ImageConfig = cfg.image
    codebook = cfg.vocab.image_codes
    report = {"preset": args.preset}
    if args.vq:
        vq = VQVAE.load(args.vq, icfg, codebook)
    else:
        train = ShapesDataset("train", icfg.image_size, args.train_size, args.seed)
        start = time.perf_counter()
        vq = train_vqvae(icfg, codebook, train, steps=args.steps, seed=args.seed)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        if args.save:
            vq.save(args.save)
    if args.classifier:
        classifier = ShapeClassifier.load(args.classifier)
    else:
        classifier = train_shape_classifier(icfg.image_size, seed=args.seed)
    heldout = ShapesDataset("heldout", icfg.image_size, args.n, args.seed)
    report.update(evaluate_vq(vq, heldout, classifier, args.n))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
