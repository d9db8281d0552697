"""Retrieval ablation: models trained with and without retrieved documents, at equal steps and
equal query-document tokens, at two budgets, each evaluated with 0, 1 and 2 retrieved
documents at generation.

  python scripts/retrieval_ablation.py --source runs/tiny --out runs/retrieval_ablation
  python scripts/retrieval_ablation.py --source runs/tiny --budgets 30 --samples-per-pair 1  (smoke)

Every run reuses the source run's tokenizers, evaluation judge and tokenised corpus (copied
from RUN/tokenizer, RUN/eval, RUN/data), so a run only trains the retrieval stage (shared by
the retrieval runs: the corpus is the same) and the model. Runs go one at a time.

Equal query-document tokens: a retrieval row holds ~(k + 1) times fewer query documents, so
the retrieval run gets as many rows per step (of --rag-seq-len tokens) as make its query
documents per step equal the baseline's, both counted on the real packed stream.

Reported per run and per k retrieved at evaluation: loss per token on held-out documents
(caption-first, no CM3, only the query document's tokens carry loss, so k does not change what
is scored), and colour-and-shape accuracy over all pairs and over held-out pairs
(engine.eval.prompt_accuracy, CFG 3). A baseline model cannot read k documents that overflow
its context; those cells are "n/a". Also the retrieval quality: how often a neighbour shows
the query's (colour, shape). Results: OUT/ablation.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.data.corpus import EncodedCorpus, document_stream, load_dataset
from engine.data.packing import IGNORE, Packer
from engine.tokenizer.vocab import Vocab

log = logging.getLogger("engine.ablation")
SHARED = ("tokenizer", "eval", "data")


def docs_per_step(cfg: EngineConfig, corpus, neighbours, steps: int = 20) -> float:
    """Query documents the packer consumes per step, measured on the real stream."""
    count = [0]

    def counted():
        for d in document_stream(corpus, Vocab.from_config(cfg.vocab), cfg.train, cfg.data, 99,
                                 neighbours):
            count[0] += 1
            yield d
    packer = Packer(counted(), Vocab.from_config(cfg.vocab), cfg.model.max_seq_len)
    for _ in range(steps):
        packer.next_batch(cfg.train.batch_size)
    return (count[0] - (packer.pending is not None)) / steps


def prepare(out: Path, source: Path, cfg: EngineConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (out / name).exists():
            shutil.copytree(source / name, out / name)
    cfg.save(out / "config.json")


def heldout_loss(model, vocab, docs, retriever, k: int) -> float | None:
    """Mean loss per query-document token; None when k documents overflow the context."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for cap, codes in docs:
            image = [vocab.image_token(int(c)) for c in codes]
            query = cap + [vocab.brk] + image + [vocab.eos]
            prefix = []
            if k and retriever is not None:
                [ids] = retriever.search([cap], torch.tensor([codes]), k)
                prefix = retriever.prefix_ids(ids)
            seq = [vocab.bos] + prefix + query
            if len(seq) > model.cfg.max_seq_len:
                return None
            ids = torch.tensor([seq])
            targets = torch.full_like(ids, IGNORE)
            start = 1 + len(prefix)
            targets[0, start - 1:-1] = ids[0, start:]
            hidden = model(ids)
            total += float(model.loss(hidden, targets)) * len(query)
            n += len(query)
    return total / n


def neighbour_quality(retriever, text, k: int = 2) -> dict:
    """Share of retrieved documents (for the evaluation prompts) whose caption names the
    prompt's colour and shape."""
    from engine.data.shapes import ALL_PAIRS, HELD_OUT
    out = {}
    for name, pairs in (("all", ALL_PAIRS), ("heldout", tuple(HELD_OUT))):
        hits, total = 0, 0
        for c, s in pairs:
            [ids] = retriever.search([text.encode(f"a {c} {s}")], None, k)
            for i in ids:
                words = text.decode(retriever.corpus.captions[i])
                hits += f"{c} {s}" in words
                total += 1
        out[f"same_colour_shape_{name}"] = round(hits / max(total, 1), 3)
    return out


def evaluate(run: Path, retriever, ks, samples_per_pair: int, n_heldout: int) -> dict:
    from engine.eval.prompt_accuracy import evaluate_prompts
    from engine.eval.shape_classifier import ShapeClassifier
    from engine.inference.image_generation import SamplingSettings
    from engine.retrieval.generation import retrieval_image_generator
    from engine.run_artifacts import RunDir, load_for_inference
    cfg, model, tok = load_for_inference(run, "cpu")
    vocab = tok.vocab
    classifier = ShapeClassifier.load(RunDir(run).classifier)
    heldout = load_dataset(cfg.data.dataset, "heldout", cfg.image, n_heldout, cfg.train.seed + 7)
    from engine.tokenizer.vqvae import images_to_tensor
    with torch.no_grad():
        codes = tok.vq.encode(images_to_tensor([heldout[i].image for i in range(len(heldout))]))
    docs = [(tok.text.encode(heldout[i].caption), codes[i].tolist()) for i in range(len(heldout))]
    s = cfg.sample
    out = {}
    for k in ks:
        loss = heldout_loss(model, vocab, docs, retriever, k)
        row = {"heldout_loss": None if loss is None else round(loss, 4)}
        if loss is not None:
            gen = retrieval_image_generator(model, vocab, tok.text, tok.vq, cfg.image.tokens_per_image,
                                            SamplingSettings(s.cfg_scale, s.temperature, s.top_p, s.top_k),
                                            cfg.train.seed, retriever, k)
            acc = evaluate_prompts(gen, classifier, cfg_scales=(s.cfg_scale,),
                                   samples_per_pair=samples_per_pair, seed=cfg.train.seed)
            a = acc[f"cfg_{s.cfg_scale:g}"]
            row.update(colour_shape=a["colour_shape"], colour_shape_heldout=a["colour_shape_heldout"])
        out[f"k={k}"] = row
        log.info("%s k=%d: %s", run.name, k, row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--out", type=Path, default=Path("runs/retrieval_ablation"))
    ap.add_argument("--budgets", default=None, help="comma-separated steps (default: the "
                    "source's train.steps and a third of it)")
    # One augmented tiny document (k = 2) is 221 tokens median, 254 max: a 256 row holds one.
    # Longer rows holding several cost more than their tokens on CPU (768: 3.4x slower per
    # token, measured), as attention over a row is computed whole and masked per document.
    ap.add_argument("--rag-seq-len", type=int, default=256)
    ap.add_argument("--samples-per-pair", type=int, default=4)
    ap.add_argument("--heldout-docs", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.source / "eval.json").is_file():
        print(f"error: {args.source}/eval.json is missing: the source run has not finished",
              file=sys.stderr)
        return 2
    from engine.pipeline import run_pipeline
    from engine.retrieval.online import Retriever
    from engine.retrieval.stage import build_retrieval
    base_cfg = EngineConfig.load(args.source / "config.json")
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else \
        [base_cfg.train.steps, base_cfg.train.steps // 3]
    corpus = EncodedCorpus.load(args.source / "data" / "train.safetensors")
    from engine.run_artifacts import RunDir
    from engine.tokenizer.bpe import TextTokenizer
    from engine.tokenizer.vqvae import VQVAE
    text = TextTokenizer.load(RunDir(args.source).bpe, Vocab.from_config(base_cfg.vocab))
    vq = VQVAE.load(RunDir(args.source).vqvae, base_cfg.image, base_cfg.vocab.image_codes).eval()
    results: dict = {"source": str(args.source), "runs": {}}
    shared_retrieval = args.out / "retrieval_shared"
    retriever = None
    # The small budget first, and within a budget the retrieval run first (its retriever also
    # serves the baseline's evaluation): results arrive early and ablation.json grows per run.
    for steps in sorted(budgets):
        for mode in ("retrieval", "baseline"):
            name = f"{mode}_{steps}"
            run = args.out / name
            cfg = EngineConfig.from_dict(base_cfg.to_dict())
            cfg.train.steps = steps
            cfg.train.checkpoint_every = max(steps, 1)
            neighbours = None
            if mode == "retrieval":
                cfg.retrieval.enabled = True
                cfg.model.max_seq_len = args.rag_seq_len
                prepare(run, args.source, cfg)
                if shared_retrieval.is_dir() and not (run / "retrieval").exists():
                    shutil.copytree(shared_retrieval, run / "retrieval")
                t = time.time()
                neighbours = build_retrieval(run, cfg, corpus, "cpu", text, vq, progress=False)
                if not shared_retrieval.is_dir():
                    shutil.copytree(run / "retrieval", shared_retrieval)
                    results["retrieval_stage_s"] = round(time.time() - t, 1)
                base_dps = docs_per_step(EngineConfig.from_dict(base_cfg.to_dict()), corpus, None)
                per_row = docs_per_step(cfg, corpus, neighbours) / cfg.train.batch_size
                cfg.train.batch_size = max(1, round(base_dps / per_row))
                log.info("query docs/step: baseline %.1f; retrieval %.2f per row -> batch %d",
                         base_dps, per_row, cfg.train.batch_size)
            prepare(run, args.source, cfg)
            t = time.time()
            if not (run / "eval.json").is_file():
                run_pipeline(cfg, run, device="cpu", resume=True, evaluate=False, progress=False)
            entry = {"steps": steps, "batch_size": cfg.train.batch_size,
                     "max_seq_len": cfg.model.max_seq_len,
                     "query_docs_per_step": round(docs_per_step(cfg, corpus, neighbours), 2),
                     "train_s": round(time.time() - t, 1)}
            if retriever is None:
                retriever = Retriever.from_run(shared_retrieval.parent / f"retrieval_{steps}")
                results["neighbour_quality"] = neighbour_quality(retriever, text)
                recall = shared_retrieval / "recall.json"
                if recall.is_file():
                    results["dual_encoder_recall"] = json.loads(recall.read_text())
                manifest = shared_retrieval / "manifest.json"
                results["retrieval_pass"] = {k: v for k, v in json.loads(manifest.read_text()).items()
                                             if k not in ("ranges", "files")}
            entry["eval"] = evaluate(run, retriever, (0, 1, 2), args.samples_per_pair, args.heldout_docs)
            results["runs"][name] = entry
            tmp = args.out / "ablation.json.tmp"
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(args.out / "ablation.json")
    print(format_table(results))
    return 0


def format_table(results: dict) -> str:
    lines = ["run                 k  heldout loss  colour+shape  colour+shape (held-out pairs)"]
    for name, r in results["runs"].items():
        for k, e in r["eval"].items():
            fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
            lines.append(f"{name:<18}  {k[2:]}  {fmt(e['heldout_loss']):>12}  "
                         f"{fmt(e.get('colour_shape')):>12}  {fmt(e.get('colour_shape_heldout')):>12}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
