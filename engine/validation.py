"""Validation loss during training: the model's loss on documents it never trains on, measured
every `train.eval_every` steps into metrics.jsonl (as <set>_loss) and drawn on loss.png.

A validation set is a fixed list of plain caption-then-image documents, <bos> caption <break>
image <eos> (no CM3 spans, no condition dropout), so each reading is the same measurement:
the loss per token of text -> image documents, comparable across steps and runs. The shapes
data has two: fresh pictures of the trained colour-shape pairs ("val") and pictures of the
held-out pairs ("val_heldout_pairs"), whose gap to "val" follows the generalisation that the
held-out prompt accuracy measures at the end. The model is measured as it trains, and, when
the run keeps an EMA of its weights (train.ema_decay > 0), with the EMA too, as
<set>_ema_loss: those are the weights inference uses. Both in the training's autocast, with
no gradient and no random draw, and the training weights are put back bit for bit after the
EMA's turn, so a run's training is the same with validation on or off.
"""
from __future__ import annotations

import torch

from engine.data.corpus import EncodedCorpus, encoded_corpus, load_dataset
from engine.data.packing import Packer, PackedBatch
from engine.tokenizer.vocab import Vocab

# dataset -> {set name: split}. Shapes pictures are drawn afresh from a seed, so its "train"
# split under another seed is unseen pictures of the trained pairs.
SPLITS = {"shapes": {"val": "train", "val_heldout_pairs": "heldout"}}
SEED_OFFSET = 2    # the training corpus draws with the run's seed, instruction tuning seed + 1


def build_sets(cfg, text, vq, data_dir, progress: bool = True) -> dict[str, EncodedCorpus]:
    """The run's validation sets, tokenised once and kept in data_dir/<name>.safetensors."""
    return {name: encoded_corpus(
                data_dir / f"{name}.safetensors",
                load_dataset(cfg.data.dataset, split, cfg.image, cfg.data.eval_size,
                             cfg.train.seed + SEED_OFFSET), text, vq, progress)
            for name, split in SPLITS.get(cfg.data.dataset, {}).items()}


def plain_document(caption: list[int], codes: list[int], vocab: Vocab) -> list[int]:
    return [vocab.bos, *caption, vocab.brk, *(vocab.image_token(int(c)) for c in codes), vocab.eos]


def batches(sets: dict[str, EncodedCorpus], vocab: Vocab, seq_len: int,
            batch_size: int) -> dict[str, list[PackedBatch]]:
    """Each set's documents packed once, every document exactly once."""
    out = {}
    for name, corpus in sets.items():
        docs = (plain_document(c, k.tolist(), vocab) for c, k in zip(corpus.captions, corpus.codes))
        out[name] = Packer(docs, vocab, seq_len).all_batches(batch_size)
    return out


@torch.no_grad()
def loss(model, batches: list[PackedBatch], device: torch.device, use_bf16: bool) -> float:
    """Mean loss per target token over the batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                hidden = model(batch.ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens)
                mean = model.loss(hidden, batch.targets)
            total += float(mean) * batch.num_targets
            count += batch.num_targets
    finally:
        model.train(was_training)
    return total / max(count, 1)
