"""python -m engine.generate: draw images for a text prompt from a trained run.

  python -m engine.generate --run runs/tiny --prompt "a red circle" --n 4 --out red.png

Writes one PNG (a grid when --n > 1). Sampling: classifier-free guidance with scale --cfg
(1 = no guidance), then temperature, TopK (0 = off) and TopP.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError

MAX_N = 64


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory from python -m engine.train")
    ap.add_argument("--prompt", required=True, help="the caption of the image to draw")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's, 3)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default 0.9)")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes; 0 = off")
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1)")
    ap.add_argument("--n", type=int, default=1, help=f"images to draw (1..{MAX_N})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="PNG file to write")
    ap.add_argument("--device", default=None)
    return ap.parse_args(argv)


def check_args(args) -> None:
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: describe the image, e.g. --prompt \"a red circle\"")
    if not 1 <= args.n <= MAX_N:
        raise ValueError(f"--n must be between 1 and {MAX_N}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError("--top-p must lie in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError("--top-k must be >= 0")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        from engine.eval.prompt_accuracy import save_prompt_grid
        from engine.eval.report import image_generator
        from engine.inference.image_generation import SamplingSettings
        from engine.run_artifacts import load_for_inference
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg, model, tok = load_for_inference(args.run, device)
        s = cfg.sample
        settings = SamplingSettings(
            cfg_scale=s.cfg_scale if args.cfg is None else args.cfg,
            temperature=s.temperature if args.temperature is None else args.temperature,
            top_p=s.top_p if args.top_p is None else args.top_p,
            top_k=s.top_k if args.top_k is None else args.top_k)
        generate = image_generator(cfg, model, tok.text, tok.vq, settings, args.seed)
        images = generate([args.prompt] * args.n, settings.cfg_scale)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp.png")
        if args.n == 1:
            images[0].resize((256, 256), resample=0).save(tmp)
        else:
            save_prompt_grid(images, [f"#{i}" for i in range(args.n)], tmp,
                             columns=min(args.n, 8))
        tmp.replace(args.out)
        print(f"wrote {args.out} ({args.n} image{'s' * (args.n > 1)} for {args.prompt!r}, "
              f"cfg {settings.cfg_scale:g})")
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
