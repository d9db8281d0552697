"""Prompt accuracy of a finished run, with as many draws as you want to pay for.

  python -m engine.eval.evaluate_run --run runs/tiny [--samples-per-pair 32] [--cfg 1 3 5]
                                     [--seed 0] [--json PATH] [--grids DIR] [--dtype bfloat16]

The training run's own evaluation uses a fixed number of draws; this re-measures its latest
checkpoint (e.g. with more draws, so that the 4 held-out pairs are not judged on a handful
of images). Prints one JSON object, the same fields as eval.json's "prompt_accuracy".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.devices import INFERENCE_DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.eval.evaluate_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="run directory of python -m engine.train")
    ap.add_argument("--samples-per-pair", type=int, default=32, help="draws per colour-shape pair")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0, 5.0], help="CFG scales")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--grids", type=Path, default=None, help="write grid_cfg<scale>.png here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(INFERENCE_DTYPES),
                    help="the model's weights and KV cache")
    return ap.parse_args(argv)


def evaluate_run(run: Path, samples_per_pair: int, cfg_scales, seed: int = 0,
                 grid_dir: Path | None = None, device: str = "cpu",
                 dtype: str = "float32") -> dict:
    from engine.eval.prompt_accuracy import evaluate_prompts
    from engine.eval.report import image_generator
    from engine.inference.image_generation import SamplingSettings
    from engine.run_artifacts import RunDir, build_classifier, load_for_inference
    cfg, model, tok = load_for_inference(run, device, dtype)
    if cfg.data.dataset != "shapes":
        raise ValueError(f"prompt accuracy needs the shapes dataset (this run used {cfg.data.dataset!r})")
    classifier = build_classifier(RunDir(run), cfg, progress=False)
    s = cfg.sample
    generate = image_generator(cfg, model, tok.text, tok.vq,
                               SamplingSettings(s.cfg_scale, s.temperature, s.top_p, s.top_k), seed)
    t0 = time.time()
    report = evaluate_prompts(generate, classifier, cfg_scales=cfg_scales,
                              samples_per_pair=samples_per_pair, seed=seed, grid_dir=grid_dir)
    report["eval_s"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> int:
    from engine.checkpoint import CheckpointError
    args = parse_args(argv)
    try:
        if args.samples_per_pair < 1:
            raise ValueError("--samples-per-pair must be >= 1")
        report = evaluate_run(args.run, args.samples_per_pair, args.cfg, args.seed, args.grids,
                              args.device, args.dtype)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
