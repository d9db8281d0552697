"""Text -> image codes for the evaluation and the training-time sample grid.

A thin entry point over the generation engine's decode loop (engine.inference.decoder): the
prompt rows are "<bos> caption <break>", the unconditional rows "<bos> <mask> <break>", and
CFG, TopK/TopP and the image-span constraint are the engine's. Kept because the report and
the trainer already hold a model, a vocab and caption ids rather than a run directory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.inference.decoder import decode
from engine.inference.params import SamplingParams
from engine.inference.prompts import PreparedPrompt
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


def generate_image_codes(model: Transformer, vocab: Vocab, captions: list[list[int]],
                         tokens_per_image: int, settings: SamplingSettings,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Caption BPE ids (one list per image to draw) -> image codes [N, tokens_per_image]."""
    if not captions:
        raise ValueError("no prompts given")
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                            top_k=settings.top_k, cfg_scale=settings.cfg_scale, modality="image")
    prompts = [PreparedPrompt("", [], text_to_image_prompt(c, vocab), unconditional_prompt(vocab),
                              None) for c in captions]
    decoded = decode(model, vocab, tokens_per_image, prompts, params, generator)
    codes = torch.tensor([d.token_ids for d in decoded], dtype=torch.long)
    return codes - vocab.image_start
