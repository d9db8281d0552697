"""The user-facing generation API, in the shape vLLM / Hugging Face users expect.

    from engine.inference import Engine, SamplingParams, MASK
    engine = Engine.from_run("runs/tiny")
    [r] = engine.generate("a red circle", SamplingParams(n=4, cfg_scale=3.0))
    r.samples[0].images[0].save("red.png")
    [cap] = engine.generate([[image]], SamplingParams(modality="text", cfg_scale=1.0))
    [fill] = engine.generate([["a <mask> circle", MASK]], SamplingParams(modality="text"))

`prompts` is one prompt or a list of prompts. A str, a PIL image or a path is one prompt; a
list of str is many text prompts (as in vLLM); any other flat list (str, images, segments,
MASK) is one mixed-modal prompt; a list of lists is many mixed-modal prompts.

`params` is one SamplingParams for every prompt, or a list with one per prompt (as in vLLM);
each SamplingParams object samples with its own seed:

    engine.generate(["a red circle", [image, "what colour is the shape?"]],
                    [SamplingParams(n=4, seed=1), SamplingParams(modality="text", cfg_scale=1)])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from engine.data.cm3 import undo_cm3
from engine.inference.decoder import Decoded, decode, per_prompt
from engine.inference.params import GenerationResult, Sample, SamplingParams, Scorer
from engine.inference.prompts import PreparedPrompt, Prompt, prepare
from engine.model import Transformer
from engine.tokenizer.document import DocumentTokenizer, ImageSegment, TextSegment


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, Path, Image.Image, TextSegment, ImageSegment)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a str, a mixed list, or a list of prompts")
    if all(isinstance(p, str) for p in prompts):
        return prompts
    if any(isinstance(p, (list, tuple)) for p in prompts):
        return prompts
    return [prompts]


def _text_of(doc) -> str:
    return "".join(seg.text for seg in doc if isinstance(seg, TextSegment))


class Engine:
    def __init__(self, model: Transformer, tokenizer: DocumentTokenizer, image_size: int,
                 scorer: Scorer | None = None):
        if tokenizer.tokens_per_image is None:
            raise ValueError("the DocumentTokenizer needs tokens_per_image for image spans")
        self.model, self.tok, self.image_size = model.eval(), tokenizer, image_size
        self.vocab = tokenizer.vocab
        self.tokens_per_image = tokenizer.tokens_per_image
        self.scorer = scorer

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device | None = None,
                 scorer: Scorer | None = None, dtype: str | torch.dtype = "float32") -> "Engine":
        """The run's latest weights on `device` (default: the GPU when there is one) in
        `dtype`, "float32" or "bfloat16"."""
        from engine.run_artifacts import load_for_inference
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg, model, tok = load_for_inference(path, device, dtype)
        return cls(model, tok, cfg.image.image_size, scorer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, prompt: Prompt, params: SamplingParams) -> PreparedPrompt:
        return prepare(prompt, self.tok, params.modality, self.image_size)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 scorer: Scorer | None = None, use_cache: bool = True,
                 on_token: Callable[[int, int, int], None] | None = None) -> list[GenerationResult]:
        """One GenerationResult per prompt, each with its params.n samples; with a scorer
        (or the engine's), samples that carry an image are re-ranked best first.

        Every SamplingParams object draws from a generator of its own, seeded with its seed;
        prompts given the same object (all of them, when one is passed) share it. All
        prompts share every forward either way. So a prompt with a SamplingParams of its own
        draws what it would draw alone, whatever runs beside it.

        `on_token(prompt_index, sample_index, token_id)` is called with every token as it is
        chosen, for streaming (sample_index counts before any re-ranking by the scorer)."""
        prompt_list = _as_prompt_list(prompts)
        params = SamplingParams() if params is None else params
        settings = per_prompt(params, len(prompt_list), "SamplingParams")  # decode validates
        made: dict[int, torch.Generator] = {}   # one per SamplingParams object
        for sp in settings:
            if id(sp) not in made:
                made[id(sp)] = torch.Generator(device=self.device).manual_seed(sp.seed)
        generators = [made[id(sp)] for sp in settings]
        prepared = [self.prepare(p, sp) for p, sp in zip(prompt_list, settings)]
        decoded = decode(self.model, self.vocab, self.tokens_per_image, prepared, settings,
                         generators, use_cache=use_cache, on_token=on_token)
        samples = self._samples(prepared, decoded)
        scorer = scorer or self.scorer
        results = []
        first = 0
        for p, sp in zip(prepared, settings):
            mine, first = samples[first:first + sp.n], first + sp.n
            if scorer is not None and all(s.images for s in mine):
                for s in mine:
                    s.score = float(scorer(p.text, s.images[0]))
                mine.sort(key=lambda s: s.score, reverse=True)
            results.append(GenerationResult(p.text, p.cond, mine))
        return results

    # -- ids -> text and images -------------------------------------------------------------
    def _samples(self, prepared: list[PreparedPrompt], decoded: list[Decoded]) -> list[Sample]:
        v = self.vocab
        out, all_codes = [], []
        for d in decoded:
            p = prepared[d.prompt_index]
            s = Sample(d.token_ids, d.logprobs, finish_reason=d.finish_reason)
            if p.spans:
                spans = self._spans(p, d.token_ids)
                filled = undo_cm3(p.cond[1:] + d.token_ids, v)
                doc = self.tok.decode(filled)
                s.text = " ".join(seg.text for seg in doc if isinstance(seg, TextSegment))
                # A span the token budget cut off stays "" (text) or None (image: never
                # decoded, as a partial image span is not an image).
                whole = [span.kind == "image" and len(ids) == self.tokens_per_image
                         for span, ids in zip(p.spans, spans)]
                s.infilled = [self.tok.text.decode(ids) if span.kind == "text" else
                              (ids if ok else None) for span, ids, ok in zip(p.spans, spans, whole)]
                codes = [tuple(t - v.image_start for t in ids) for ids, ok in zip(spans, whole) if ok]
            else:
                doc = self.tok.decode(d.token_ids)
                s.text = _text_of(doc)
                codes = [seg.codes for seg in doc if isinstance(seg, ImageSegment)]
            s.image_codes = codes
            all_codes += codes
            out.append(s)
        images = self._decode_images(all_codes)
        for s in out:
            s.images, images = images[:len(s.image_codes)], images[len(s.image_codes):]
            if s.infilled:
                it = iter(s.images)
                s.infilled = [x if x is None or isinstance(x, str) else next(it) for x in s.infilled]
        return out

    def text_so_far(self, token_ids: list[int]) -> str:
        """The text of a sample's tokens so far, as its Sample.text will read (prompts
        without <mask>): what a stream sends as it grows."""
        return _text_of(self.tok.decode(token_ids))

    def _spans(self, p: PreparedPrompt, generated: list[int]) -> list[list[int]]:
        """The ids generated for each infill span (after its sentinel, before the next)."""
        v = self.vocab
        spans: list[list[int]] = [[]]
        for t in generated:
            if v.is_sentinel(t):
                spans.append([])
            elif t != v.eos:
                spans[-1].append(t)
        return (spans + [[]] * len(p.spans))[:len(p.spans)]

    def _decode_images(self, codes: list[tuple[int, ...]]) -> list[Image.Image]:
        # An image span is always complete (constraints.py), so every code tuple decodes.
        if not codes:
            return []
        if self.tok.vq is None:
            raise ValueError("this engine has no VQ-VAE to turn image codes into pictures")
        return self.tok.decode_images(codes)
