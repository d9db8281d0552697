"""Caption -> image recall of the dual encoder on held-out shapes documents.

Many captions fit many images ("a red circle" is true of every lone red circle), so a hit is
any gallery image whose ground-truth objects match what the caption says: the same set of
(colour, shape) pairs, and the same (colour, shape, position) triples when the caption names
positions (every shapes position phrase is "in/at/on the ..."). Sizes are not compared (the
dataset does not record them per object). The strict form (only the caption's own image is a
hit) is reported beside it, and both are also given over the held-out (colour, shape) pairs,
which the encoder never saw together in training.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.retrieval.dual_encoder import DualEncoder


def names_positions(caption: str) -> bool:
    return " the " in f" {caption} "


def matches(caption: str, query_objects, image_objects) -> bool:
    if names_positions(caption):
        return frozenset(query_objects) == frozenset(image_objects)
    return frozenset((c, s) for c, s, _ in query_objects) == \
        frozenset((c, s) for c, s, _ in image_objects)


@torch.no_grad()
def caption_image_recall(encoder: DualEncoder, caption_ids: list[list[int]], codes: torch.Tensor,
                         captions: list[str], objects: list, ks=(1, 5),
                         heldout_pairs=frozenset()) -> dict:
    """Every caption queries the gallery of all the documents' images."""
    t = encoder.encode_documents(captions=caption_ids)
    im = encoder.encode_documents(codes=codes)
    order = torch.topk(t @ im.T, max(ks), dim=1).indices.numpy()
    n = len(captions)
    hit = np.array([[matches(captions[q], objects[q], objects[j]) for j in order[q]] for q in range(n)])
    strict = order == np.arange(n)[:, None]
    held = np.array([any((c, s) in heldout_pairs for c, s, _ in objects[q]) for q in range(n)])
    out: dict = {"queries": n, "heldout_pair_queries": int(held.sum())}
    for k in ks:
        out[f"recall@{k}"] = round(float(hit[:, :k].any(1).mean()), 4)
        out[f"strict_recall@{k}"] = round(float(strict[:, :k].any(1).mean()), 4)
        if held.any():
            out[f"heldout_pairs_recall@{k}"] = round(float(hit[held, :k].any(1).mean()), 4)
    return out


def heldout_recall(encoder: DualEncoder, dataset, text_tok, vq, size: int = 1000) -> dict:
    """Encodes `size` items of a ShapesDataset split and runs caption_image_recall on them."""
    from engine.data.shapes import HELD_OUT
    from engine.tokenizer.vqvae import images_to_tensor
    items = [dataset[i] for i in range(min(size, len(dataset)))]
    with torch.no_grad():
        codes = torch.cat([vq.encode(images_to_tensor([x.image for x in items[s:s + 256]])).cpu()
                           for s in range(0, len(items), 256)])
    return caption_image_recall(encoder, [text_tok.encode(x.caption) for x in items], codes,
                                [x.caption for x in items], [x.objects for x in items],
                                heldout_pairs=HELD_OUT)
