"""How often CM3 infilling recovers a masked word of a training caption.

  python -m engine.eval.infill_rate --run runs/tiny [--n 64] [--seed 0]

Each document is a training caption followed by its image ("caption <break> image", the
direction most training documents take). One content word, alternately the colour and the
shape, becomes "<mask>" on its BPE boundary (the span is " red", leading space included, as
the byte-level BPE cuts it); the engine fills the span greedily and it counts as recovered
when the filled text equals the word. Chance is 1 / (number of colours) or 1 / (number of
shapes) for the masked slot, averaged. Captions that name only a colour or only a shape are
skipped.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import torch


def _cases(captions: list[str], colours, shapes):
    for i, caption in enumerate(captions):
        words = caption.split()
        kinds = [(colours, w) for w in words if w in colours] + [(shapes, w) for w in words if w in shapes]
        # Only captions that name both: in "a <mask>" (from "a star") the slot may fairly
        # take "orange star", so a one-word answer would not be the only right one.
        if not any(p is colours for p, _ in kinds) or not any(p is shapes for p, _ in kinds):
            continue
        pool, word = kinds[i % len(kinds)]
        masked = re.sub(rf" {word}\b", "<mask>", caption, count=1)
        if "<mask>" in masked:
            yield i, masked, word, 1 / len(pool)


def measure(run: str, n_captions: int = 64, seed: int = 0, device: str | None = None) -> dict:
    from engine.data.corpus import load_dataset
    from engine.data.shapes import COLOURS, SHAPES
    from engine.inference import Engine, SamplingParams
    from engine.run_artifacts import RunDir
    cfg = RunDir(run).load_config()
    engine = Engine.from_run(run, device)
    data = load_dataset(cfg.data.dataset, "train", cfg.image, n_captions, seed)
    cases = list(_cases([data[i].caption for i in range(len(data))], set(COLOURS), set(SHAPES)))
    prompts = [[masked, data[i].image] for i, masked, _, _ in cases]
    params = SamplingParams(modality="text", temperature=0.0, cfg_scale=1.0, max_new_tokens=8)
    results = engine.generate(prompts, params)
    hits = [r.samples[0].infilled[0].strip() == word for r, (_, _, word, _) in zip(results, cases)]
    return {"run": str(run), "cases": len(cases), "rate": sum(hits) / max(len(cases), 1),
            "chance": sum(c for *_, c in cases) / max(len(cases), 1),
            "examples": [{"masked": m, "target": w, "filled": r.samples[0].infilled[0]}
                         for r, (_, m, w, _) in list(zip(results, cases))[:8]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=64, help="training captions to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        report = measure(args.run, args.n, args.seed, args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
