"""The generation engine on its default paged KV cache gives exactly the contiguous cache's
greedy tokens: CFG image rows, n samples forked from one prefill, text, GQA, infilling."""
from __future__ import annotations

import pytest

from engine.inference import MASK, SamplingParams

CASES = {
    "image_cfg_n3": (["a red circle", "a blue square on the left"], dict(n=3, cfg_scale=3.0)),
    "text": (["a small green triangle", "make it blue"], dict(modality="text", max_new_tokens=12)),
    "infill": ([["a <mask> circle", MASK]], dict(modality="text", max_new_tokens=24, n=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("which", ["engine", "gqa_engine"])
def test_paged_default_equals_contiguous(case, which, request):
    engine = request.getfixturevalue(which)
    prompts, kw = CASES[case]
    params = SamplingParams(temperature=0.0, **kw)
    paged = engine.generate(prompts, params)
    contiguous = engine.generate(prompts, params, use_cache="contiguous")
    got = [[s.token_ids for s in r.samples] for r in paged]
    want = [[s.token_ids for s in r.samples] for r in contiguous]
    assert got == want and all(ids for r in got for ids in r)


def test_bad_cache_kind_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="use_cache must be"):
        engine.generate("a red circle", SamplingParams(temperature=0.0), use_cache="fast")
