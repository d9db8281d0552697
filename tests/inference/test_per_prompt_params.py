"""One SamplingParams per prompt (vLLM's convention), as the server's batches use: every
prompt gets what it asked for, from draws of its own, while all share each forward."""
from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from engine.inference import SamplingParams

IMAGE = SamplingParams(n=2, seed=4, cfg_scale=3.0, top_p=0.9)
TEXT = SamplingParams(modality="text", cfg_scale=1.0, temperature=0.8, seed=9, max_new_tokens=6)
CD_K = SamplingParams(n=1, seed=2, cd_k=(0.1, 4), top_k=8)


def _tokens(results):
    return [[s.token_ids for s in r.samples] for r in results]


def test_each_prompt_draws_as_it_would_alone(engine):
    prompts = ["a red circle", "a blue square on the left", "a small green triangle"]
    together = engine.generate(prompts, [IMAGE, TEXT, CD_K])
    alone = [engine.generate(p, sp)[0] for p, sp in zip(prompts, [IMAGE, TEXT, CD_K])]
    assert _tokens(together) == _tokens(alone)
    first, second, third = together
    assert len(first.samples) == 2 and all(isinstance(s.images[0], Image.Image)
                                           for s in first.samples)
    assert not second.samples[0].images and len(second.samples[0].token_ids) <= 6
    assert len(third.samples) == 1 and third.samples[0].images


def test_a_prompts_draws_do_not_depend_on_its_neighbours(engine):
    a = engine.generate(["a red circle", "make it blue"], [IMAGE, TEXT])[0]
    b = engine.generate(["a red circle", "a small green triangle"],
                        [IMAGE, SamplingParams(n=3, seed=1)])[0]
    assert _tokens([a]) == _tokens([b])
    # prompts given the same object share its generator: the same as passing it once
    shared = engine.generate(["a red circle", "make it blue"], IMAGE)
    assert _tokens(engine.generate(["a red circle", "make it blue"], [IMAGE, IMAGE])) == _tokens(shared)
    # and the draws matter: another seed samples other images
    other = engine.generate("a red circle", dataclasses.replace(IMAGE, seed=5))
    assert _tokens(other) != _tokens([a])


def test_the_list_must_match_the_prompts(engine):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        engine.generate(["a", "b", "c"], [IMAGE, TEXT])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(["a", "b"], [IMAGE, SamplingParams(top_p=0)])
