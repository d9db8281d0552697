"""What a caller asks for (SamplingParams) and what comes back (GenerationResult, Sample).

Conventions follow vLLM / Hugging Face: one SamplingParams applies to every prompt of a
`generate` call; `n` samples per prompt; temperature 0 is greedy; top_k 0 and top_p 1 are off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from PIL import Image

MAX_N = 64                 # samples per prompt: bounds the batch a single call can build
MAX_NEW_TOKENS = 65_536    # a sanity bound; the real limit is the model's context

# (prompt text, generated image) -> score; higher is better. The retriever's dual encoder
# (CLIP-style re-ranking in the paper) plugs in here.
Scorer = Callable[[str, Image.Image], float]


@dataclass
class SamplingParams:
    """Decoding settings.

    modality "image": the prompt gets a trailing <break> and one image span of exactly
    tokens_per_image codes is forced; generation ends with it. "text": text is sampled until
    <eos> or max_new_tokens; an image span opens only when the model samples an image code
    right after a <break> (see engine/inference/constraints.py).
    cfg_scale applies inside image spans only (1 = off); cd_k=(alpha, k) replaces the CFG mix
    with contrastive decoding TopK there. image_cfg_scale switches on the 3-way
    (InstructPix2Pix) form for prompts that contain an image: rows "no text, no image",
    "image only" and "full", mixed as none + image_cfg*(image - none) + cfg*(full - image).
    max_new_tokens None = as many as the modality needs (image: tokens_per_image; text: up to
    the context).
    """
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cfg_scale: float = 3.0
    image_cfg_scale: float | None = None
    cd_k: tuple[float, int] | None = None
    n: int = 1
    seed: int = 0
    max_new_tokens: int | None = None
    modality: Literal["image", "text"] = "image"

    def validate(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {self.modality!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.cfg_scale < 0 or (self.image_cfg_scale is not None and self.image_cfg_scale < 0):
            raise ValueError("guidance scales must be >= 0 (1 = no guidance)")
        if self.cd_k is not None:
            alpha, k = self.cd_k
            if not alpha > 0 or int(k) < 1:
                raise ValueError(f"cd_k=(alpha, k) needs alpha > 0 and k >= 1, got {self.cd_k}")
            if self.image_cfg_scale is not None:
                raise ValueError("cd_k and the 3-way image_cfg_scale cannot be combined: "
                                 "CD-K contrasts exactly one conditional and one unconditional row")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N} samples per prompt, got {self.n}")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, "
                             f"got {self.max_new_tokens}")

    @property
    def guided(self) -> bool:
        """Whether image spans need unconditional rows at all."""
        return self.cd_k is not None or self.cfg_scale != 1.0 or self.image_cfg_scale is not None


def with_run_defaults(sample, modality: str, **given) -> SamplingParams:
    """SamplingParams for `modality`: every field given (not None) as given; guidance,
    temperature, TopP and TopK not given from a run's `sample` config section, except that
    text outputs get no guidance (it only acts inside image spans, and unguided text does not
    pay for unconditional rows); the rest as SamplingParams' defaults."""
    run = {"cfg_scale": sample.cfg_scale if modality == "image" else 1.0,
           "temperature": sample.temperature, "top_p": sample.top_p, "top_k": sample.top_k}
    asked = {name: value for name, value in given.items() if value is not None}
    return SamplingParams(modality=modality, **{**run, **asked})


@dataclass
class Sample:
    """One generated continuation. `token_ids` are the sampled ids (forced ones included,
    e.g. infilling sentinels); `logprobs[i]` is the log-probability of token_ids[i] under the
    distribution it was drawn from (0.0 for forced tokens)."""
    token_ids: list[int]
    logprobs: list[float]
    text: str = ""
    images: list[Image.Image] = field(default_factory=list, repr=False)
    image_codes: list[tuple[int, ...]] = field(default_factory=list, repr=False)
    # Infilling: per <mask> span its text, or its image (None if the budget cut it off).
    infilled: list[str | Image.Image | None] = field(default_factory=list, repr=False)
    finish_reason: Literal["eos", "length", "image"] = "eos"
    score: float | None = None

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class GenerationResult:
    """The n samples for one prompt, best first when a scorer re-ranked them."""
    prompt: str
    prompt_ids: list[int]
    samples: list[Sample]

    @property
    def image(self) -> Image.Image | None:
        s = self.samples[0]
        return s.images[0] if s.images else None

    @property
    def text(self) -> str:
        return self.samples[0].text
