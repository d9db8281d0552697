"""Text -> image with classifier-free guidance: a plain cached decode loop.

Prompt rows are "<bos> caption <break>"; the unconditional rows are "<bos> <mask> <break>"
(the form the model saw under CFG condition dropout). Every step runs the conditional and
the unconditional batch through the model with their own contiguous KV caches, mixes the
logits in engine.ops.cfg_sample restricted to the image-code range, and appends the drawn
code to both. Prompts are grouped by length so each group is one rectangular batch.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from engine import ops
from engine.inference.kv_cache import ContiguousKVCache
from engine.model import Transformer
from engine.tokenizer.vocab import Vocab


@dataclass
class SamplingSettings:
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0


def text_to_image_prompt(caption_ids: list[int], vocab: Vocab) -> list[int]:
    return [vocab.bos] + caption_ids + [vocab.brk]


def unconditional_prompt(vocab: Vocab) -> list[int]:
    return [vocab.bos, vocab.mask, vocab.brk]


def _new_cache(model: Transformer, batch: int, length: int, device) -> ContiguousKVCache:
    c = model.cfg
    dtype = next(model.parameters()).dtype
    return ContiguousKVCache(c.n_layers, batch, c.kv_heads, c.head_dim, length, dtype, device)


@torch.no_grad()
def _generate_group(model, vocab, prompts, tokens, s: SamplingSettings, generator, device):
    b = len(prompts)
    guided = s.cfg_scale != 1.0
    rows = [torch.tensor(prompts, device=device)]
    if guided:
        rows.append(torch.tensor([unconditional_prompt(vocab)] * b, device=device))
    caches = [_new_cache(model, b, r.shape[1] + tokens, device) for r in rows]
    last = [model.logits(model(r, cache=c)[:, -1]) for r, c in zip(rows, caches)]
    allowed = torch.tensor([vocab.image_start, vocab.size], device=device)
    out = torch.empty(b, tokens, dtype=torch.long, device=device)
    for t in range(tokens):
        logits = torch.cat(last) if guided else last[0]
        tok, _ = ops.cfg_sample(logits, cfg_scale=s.cfg_scale if guided else None,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                allowed=allowed, generator=generator)
        out[:, t] = tok
        if t + 1 < tokens:
            last = [model.logits(model(tok[:, None], cache=c)[:, -1]) for c in caches]
    return out - vocab.image_start


@torch.no_grad()
def generate_image_codes(model: Transformer, vocab: Vocab, captions: list[list[int]],
                         tokens_per_image: int, settings: SamplingSettings,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Caption BPE ids (one list per image to draw) -> image codes [N, tokens_per_image]."""
    if not captions:
        raise ValueError("no prompts given")
    device = next(model.parameters()).device
    prompts = [text_to_image_prompt(c, vocab) for c in captions]
    longest = max(len(p) for p in prompts) + tokens_per_image
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"prompt plus image is {longest} tokens; the context is "
                         f"{model.cfg.max_seq_len}: shorten the prompt")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out = torch.empty(len(prompts), tokens_per_image, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for _, idx in sorted(groups.items()):
            codes = _generate_group(model, vocab, [prompts[i] for i in idx], tokens_per_image,
                                    settings, generator, device)
            out[idx] = codes.cpu()
    finally:
        model.train(was_training)
    return out
