"""python -m engine.generate: text -> image, captioning, question answering, editing, infilling.

  python -m engine.generate --run runs/tiny --prompt "a red circle" --n 4 --out red.png
  python -m engine.generate --run runs/tiny --image shape.png                       (caption)
  python -m engine.generate --run runs/tiny --image shape.png --prompt "what colour is the shape?"
  python -m engine.generate --run runs/tiny --image shape.png --prompt "make it blue" --out e.png
  python -m engine.generate --run runs/tiny --prompt "a <mask> circle" --output text
  python -m engine.generate --run runs/tiny --prompts prompts.txt --out-dir samples/  (batch)
  python -m engine.generate --run runs/tiny --prompts pictures.jsonl --out-dir captions/

What comes out (--output overrides): no --image -> an image; --image alone -> text (a
caption); --image with a prompt ending in "?" -> text (the answer); --image with any other
prompt -> an image (an edit). A prompt with "<mask>" infills it. Images go to --out as one
PNG (a grid when --n > 1); text goes to stdout, one line per sample. Sampling: CFG scale --cfg
(1 = off) inside image spans, --image-cfg for the 3-way editing form, --cd-k ALPHA,K for
contrastive decoding, then temperature (0 = greedy), TopK (0 = off) and TopP.

--prompts FILE samples one prompt a line in batches into --out-dir, one PNG per image sample
and results.jsonl, and continues an interrupted job (engine/batch_generation.py). A .jsonl
FILE takes pictures too: one {"prompt": ..., "image": ...} a line, either key optional.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


from engine.checkpoint import CheckpointError
from engine.devices import INFERENCE_DTYPES
from engine.inference.params import MAX_N

GRID_COLUMNS = 8
CELL = 256          # pixels per image in the written PNG (nearest-neighbour upscaling)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory from python -m engine.train")
    ap.add_argument("--prompt", default=None, help="caption, question, instruction or text with <mask>")
    ap.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                    help="one prompt a line (or a .jsonl file of {\"prompt\", \"image\"} "
                         "objects): sample them all into --out-dir")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="with --prompts: where the PNGs and results.jsonl go")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="with --prompts: prompts per engine call (default 16)")
    ap.add_argument("--image", type=Path, default=None, help="an input image (any size and mode: "
                    "converted to RGB, centre-cropped square, resized to the run's image size)")
    ap.add_argument("--output", choices=("image", "text"), default=None,
                    help="what to generate (default: inferred, see above)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's, 3)")
    ap.add_argument("--image-cfg", type=float, default=None,
                    help="image guidance scale for editing: switches on the 3-way CFG form")
    ap.add_argument("--cd-k", default=None, metavar="ALPHA,K", help="contrastive decoding TopK")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default 0.9)")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off")
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="text length limit")
    ap.add_argument("--n", type=int, default=1, help=f"samples to draw (1..{MAX_N})")
    ap.add_argument("--retrieve", type=int, default=0, metavar="K",
                    help="prepend K documents retrieved from the run's training corpus to the "
                         "prompt (needs a run trained with --retrieve; engine/retrieval)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="PNG file to write (image outputs)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=list(INFERENCE_DTYPES),
                    help="the model's weights and KV cache (default float32)")
    return ap.parse_args(argv)


def output_modality(args) -> str:
    if args.output:
        return args.output
    if args.image is None:
        return "text" if args.prompt and "<mask>" in args.prompt else "image"
    if not args.prompt or args.prompt.rstrip().endswith("?"):
        return "text"
    return "image"


def check_args(args) -> None:
    if args.prompts is not None:
        if args.prompt is not None or args.image is not None or args.out is not None:
            raise ValueError("--prompts takes its prompts from the file and writes to --out-dir: "
                             "drop --prompt, --image and --out")
        if args.out_dir is None:
            raise ValueError("--prompts needs --out-dir DIR for the samples")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
    elif args.out_dir is not None:
        raise ValueError("--out-dir goes with --prompts FILE; one prompt writes --out FILE.png")
    one_prompt = args.prompts is None
    if one_prompt and args.image is None and (args.prompt is None or not args.prompt.strip()):
        raise ValueError("the prompt is empty: describe the image, e.g. --prompt \"a red circle\", "
                         "or give --image")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: drop it (captioning) or write some text")
    if args.retrieve < 0:
        raise ValueError("--retrieve takes the number of documents K >= 0")
    if not 1 <= args.n <= MAX_N:
        raise ValueError(f"--n must be between 1 and {MAX_N}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError("--top-p must lie in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError("--top-k must be >= 0")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    if output_modality(args) == "image" and one_prompt:
        if args.out is None:
            raise ValueError("an image output needs --out FILE.png")
        if args.out.suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out}")


def parse_cd_k(text: str | None) -> tuple[float, int] | None:
    if text is None:
        return None
    try:
        alpha, k = text.split(",")
        return float(alpha), int(k)
    except ValueError:
        raise ValueError(f"--cd-k takes ALPHA,K (e.g. 0.1,8); got {text!r}") from None


def save_images(images, labels: list[str], path: Path) -> None:
    """One PNG, written to a temporary name and renamed (never half a file)."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    if len(images) == 1:
        images[0].resize((CELL, CELL), resample=Image.Resampling.NEAREST).save(tmp)
    else:
        try:
            from engine.eval.prompt_accuracy import save_prompt_grid
        except ImportError:
            save_prompt_grid = None
        columns = min(len(images), GRID_COLUMNS)
        if save_prompt_grid is not None:
            save_prompt_grid(images, labels, tmp, columns=columns)
        else:
            rows = -(-len(images) // columns)
            grid = Image.new("RGB", (columns * CELL, rows * CELL), "white")
            for i, im in enumerate(images):
                cell = im.resize((CELL, CELL), resample=Image.Resampling.NEAREST)
                grid.paste(cell, ((i % columns) * CELL, (i // columns) * CELL))
            grid.save(tmp)
    tmp.replace(path)


def build_prompt(text: str | None, image: Path | None) -> list:
    """The engine's prompt: the picture (read from its file) first, then the text."""
    from engine.inference.prompts import load_image
    items: list = []
    if image is not None:
        items.append(load_image(image))
    if text is not None:
        items.append(text)
    return items


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        from engine.inference import Engine
        from engine.inference.params import with_run_defaults
        from engine.run_artifacts import RunDir
        prompts = None
        if args.prompts is not None:
            from engine.batch_generation import read_prompts
            prompts = read_prompts(args.prompts)   # a missing file fails before the model loads
        engine = Engine.from_run(args.run, args.device, dtype=args.dtype)
        if args.retrieve:
            from engine.retrieval.generation import RetrievalEngine
            from engine.retrieval.online import Retriever
            engine = RetrievalEngine(engine, Retriever.from_run(args.run), args.retrieve)

        defaults = RunDir(args.run).load_config().sample

        def settings(modality: str):
            return with_run_defaults(
                defaults, modality, cfg_scale=args.cfg,
                image_cfg_scale=args.image_cfg, cd_k=parse_cd_k(args.cd_k),
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, n=args.n,
                seed=args.seed, max_new_tokens=args.max_new_tokens)
        if prompts is not None:
            from engine.batch_generation import generate_from_file
            # --max-new-tokens limits the file's text answers; its pictures take what they need
            bases = {"image": dataclasses.replace(settings("image"), max_new_tokens=None),
                     "text": settings("text")}
            for base in bases.values():
                base.validate()
            sampled = generate_from_file(engine, prompts, bases, args.output, args.out_dir,
                                         args.batch_size)
            print(f"sampled {sampled} of {len(prompts)} prompts into {args.out_dir} "
                  f"({len(prompts) - sampled} were already there); see results.jsonl")
            return 0
        modality = output_modality(args)
        params = settings(modality)
        [result] = engine.generate([build_prompt(args.prompt, args.image)], params)
        what = args.prompt if args.prompt is not None else str(args.image)
        if modality == "image":
            images = [smp.images[0] for smp in result.samples]
            save_images(images, [f"#{i}" for i in range(len(images))], args.out)
            print(f"wrote {args.out} ({args.n} image{'s' * (args.n > 1)} for {what!r}, "
                  f"cfg {params.cfg_scale:g})")
        else:
            for smp in result.samples:
                print(smp.text.strip())
            if args.out is not None and any(smp.images for smp in result.samples):
                save_images([im for smp in result.samples for im in smp.images], [], args.out)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
