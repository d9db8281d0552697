"""python -m engine.generate --prompts FILE --out-dir DIR: many prompts in batches, for
evaluations (FID, CLIP score, prompt accuracy) and datasets.

FILE holds one prompt a line (blank lines and lines starting with "#" are skipped); a line with
<mask> is infilled as text, every other line drawn as an image (--output overrides). A FILE
ending in .jsonl holds one JSON object a line instead, {"prompt": ..., "image": ...}, either
key optional: "image" names a picture (relative paths from FILE's folder) for captioning
({"image"} alone), questions (a prompt ending in "?") and edits (any other prompt), the
outputs inferred as for --image.

Prompt i (its line number among the prompts, from 0) is sampled with seed --seed + i from a
generator of its own, so its samples do not depend on --batch-size or on the other lines. DIR
receives IIIII_S.png for sample S of prompt I (five digits) at the model's own resolution (no
upscaling: what metrics expect) and results.jsonl, one line per prompt as its batch
finishes: {"index", "prompt", "image", "images" (file names), "texts"}. Run again with the
same arguments and the prompts already in results.jsonl are skipped, so an interrupted job
continues where it stopped, with the samples an uninterrupted one would have drawn.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from tqdm.auto import tqdm


class PromptLine(NamedTuple):
    text: str | None           # caption, question, instruction or text with <mask>
    image: Path | None = None  # an input picture


def read_prompts(path: Path) -> list[PromptLine]:
    """FILE's prompts; every problem (a bad line, a missing picture) is reported here, before
    the model loads, with its line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"no prompts file {path}: one prompt a line") from None
    if path.suffix == ".jsonl":
        prompts = [_json_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [PromptLine(line.strip()) for line in lines
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one a line; '#' starts a comment)")
    return prompts


def _json_line(path: Path, number: int, line: str) -> PromptLine:
    where = f"{path}:{number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not a JSON object ({exc.msg})") from None
    if not isinstance(entry, dict) or not entry or set(entry) - {"prompt", "image"}:
        raise ValueError(f"{where}: expected an object with \"prompt\" and/or \"image\", "
                         f"got {line.strip()[:80]}")
    text, image = entry.get("prompt"), entry.get("image")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"{where}: \"prompt\" must be non-empty text")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError(f"{where}: \"image\" must be a file name")
        image = path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image file {image} does not exist")
    return PromptLine(text.strip() if text is not None else None, image)


def done_indices(results: Path) -> set[int]:
    if not results.is_file():
        return set()
    return {json.loads(line)["index"] for line in results.read_text().splitlines() if line.strip()}


def generate_from_file(engine, prompts: list[PromptLine], bases: dict, output: str | None,
                       out_dir: Path, batch_size: int, progress: bool = True) -> int:
    """Samples every prompt not yet in out_dir/results.jsonl; returns how many it sampled.
    `bases`: output modality ("image", "text") -> the SamplingParams its prompts start from
    (their seed: the first prompt's)."""
    from engine.generate import build_prompt, output_modality
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    todo = [i for i in range(len(prompts)) if i not in done_indices(results)]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="prompts",
               disable=not progress, dynamic_ncols=True)
    with results.open("a") as log:
        for first in range(0, len(todo), batch_size):
            chunk = todo[first:first + batch_size]
            settings = []
            for i in chunk:
                base = bases[output_modality(SimpleNamespace(
                    output=output, prompt=prompts[i].text, image=prompts[i].image))]
                settings.append(dataclasses.replace(base, seed=base.seed + i))
            # Pictures are read a batch at a time, so a long job never holds them all.
            batch = [build_prompt(prompts[i].text, prompts[i].image) for i in chunk]
            for i, result in zip(chunk, engine.generate(batch, settings)):
                images = []
                for s, smp in enumerate(result.samples):
                    for k, im in enumerate(smp.images):
                        name = f"{i:05d}_{s}.png" if k == 0 else f"{i:05d}_{s}_{k}.png"
                        im.save(out_dir / name)
                        images.append(name)
                image = prompts[i].image
                record = {"index": i, "prompt": prompts[i].text,
                          "image": str(image) if image is not None else None, "images": images,
                          "texts": [smp.text.strip() for smp in result.samples]}
                log.write(json.dumps(record) + "\n")
            log.flush()  # a batch is on disk before the next starts
            bar.update(len(chunk))
    bar.close()
    return len(todo)
