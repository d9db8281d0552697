"""Retrieval at generation time: retrieved documents prepended to the prompt.

`RetrievalEngine` is the generation engine (engine.inference.Engine) with one change: each
prepared prompt's conditional row becomes  <bos> [retrieved documents] <rest of the prompt>,
in the layout training used (engine.data.corpus). The unconditional CFG row is untouched
("<bos> <mask> <break>"): training drops the retrieved documents together with the caption,
so guidance amplifies everything the prompt and its neighbours say. Infilling prompts are
refused (their output is spliced back into the prompt row, neighbours included).

`retrieval_image_generator` is the same for the evaluation's (captions, cfg_scale) -> images
callable (engine.eval.report.image_generator's shape), with k = 0 giving the plain prompts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.inference.decoder import decode
from engine.inference.engine import Engine
from engine.inference.image_generation import SamplingSettings, text_to_image_prompt, unconditional_prompt
from engine.inference.params import SamplingParams
from engine.inference.prompts import PreparedPrompt
from engine.retrieval.online import Retriever
from engine.tokenizer.document import ImageSegment, TextSegment


class RetrievalEngine(Engine):
    def __init__(self, engine: Engine, retriever: Retriever, k: int):
        super().__init__(engine.model, engine.tok, engine.image_size, engine.scorer)
        if k < 0:
            raise ValueError(f"the number of retrieved documents must be >= 0, got {k}")
        self.retriever, self.k = retriever, k
        self.last_retrieved: list[list[int]] = []    # doc ids per prompt of the last call

    @classmethod
    def from_run(cls, path: str | Path, device=None, scorer=None, k: int = 2) -> "RetrievalEngine":
        return cls(Engine.from_run(path, device, scorer), Retriever.from_run(path), k)

    def generate(self, prompts, params=None, scorer=None, use_cache: bool = True, on_token=None):
        self.last_retrieved = []
        return super().generate(prompts, params, scorer, use_cache, on_token)

    def prepare(self, prompt, params: SamplingParams) -> PreparedPrompt:
        p = super().prepare(prompt, params)
        if self.k == 0:
            return p
        if p.spans:
            raise ValueError("retrieval does not combine with infilling (<mask> in the prompt): "
                             "drop --retrieve or the <mask>")
        captions = [self.tok.text.encode(s.text) for s in p.document if isinstance(s, TextSegment)]
        images = [s for s in p.document if isinstance(s, ImageSegment)]
        # The query is the prompt as a document: its text (all text segments) and its first image.
        caption = [t for c in captions for t in c] if captions else None
        codes = None
        if images:
            seg = images[0]
            codes = torch.tensor([seg.codes if seg.codes is not None else
                                  self.tok.image_codes([seg.image])[0]], dtype=torch.long)
        [ids] = self.retriever.search([caption] if caption is not None else None, codes, self.k)
        self.last_retrieved.append(ids)
        image_first = isinstance(p.document[0], ImageSegment)
        p.cond = [p.cond[0]] + self.retriever.prefix_ids(ids, image_first) + p.cond[1:]
        if p.image_only is not None:
            p.image_only = [p.image_only[0]] + self.retriever.prefix_ids(ids, image_first) + p.image_only[1:]
        return p


def retrieval_image_generator(model, vocab, text, vq, tokens_per_image: int, base: SamplingSettings,
                              seed: int, retriever: Retriever | None, k: int):
    """(captions, cfg_scale) -> PIL images, with k retrieved documents before each caption."""
    from engine.tokenizer.vqvae import tensor_to_images
    gen = torch.Generator().manual_seed(seed)
    cache: dict[str, list[int]] = {}

    def prefix(caption: str, ids: list[int]) -> list[int]:
        if k == 0 or retriever is None:
            return []
        if caption not in cache:
            [docs] = retriever.search([ids], None, k)
            cache[caption] = retriever.prefix_ids(docs)
        return cache[caption]

    def generate(captions: list[str], cfg_scale: float):
        params = SamplingParams(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k,
                                cfg_scale=cfg_scale, modality="image")
        prompts = []
        for c in captions:
            ids = text.encode(c)
            cond = text_to_image_prompt(ids, vocab)
            cond = cond[:1] + prefix(c, ids) + cond[1:]
            prompts.append(PreparedPrompt(c, [], cond, unconditional_prompt(vocab), None))
        decoded = decode(model, vocab, tokens_per_image, prompts, params, gen)
        codes = torch.tensor([d.token_ids for d in decoded], dtype=torch.long) - vocab.image_start
        with torch.no_grad():
            return tensor_to_images(vq.decode(codes))
    return generate
