"""CM3 infilling: layout of the prompt, span generation, splicing back."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from engine.inference.params import SamplingParams
from engine.inference.prompts import MASK


def test_text_span_layout_and_splice(engine):
    v = engine.vocab
    params = SamplingParams(modality="text", max_new_tokens=8, temperature=1.0, seed=2, n=3)
    p = engine.prepare("a <mask> circle", params)
    assert p.cond[-1] == v.sentinel(0) and p.cond.count(v.sentinel(0)) == 2
    assert [s.kind for s in p.spans] == ["text"]
    [r] = engine.generate(["a <mask> circle"], params)
    for s in r.samples:
        [filled] = s.infilled
        assert s.text == f"a{filled} circle"      # the span holds the space before it
        assert all(not v.is_image(t) for t in s.token_ids)
        assert s.finish_reason in ("eos", "length")


def test_a_text_span_takes_the_space_before_it(engine):
    """CM3 spans start on BPE words, which carry their leading space (" red"): "a <mask>" is
    read as "a" then the span, never as "a", a lone space, then the span."""
    params = SamplingParams(modality="text")
    assert engine.prepare("a <mask> circle", params).cond == engine.prepare("a<mask> circle", params).cond
    assert engine.prepare("<mask> circle", params).cond[1] == engine.vocab.sentinel(0)
    spaced = engine.prepare("a red circle <mask>", params).cond
    assert spaced == engine.prepare("a red circle<mask>", params).cond


def test_several_spans_and_an_image_hole(engine):
    v, tpi = engine.vocab, engine.tokens_per_image
    params = SamplingParams(modality="text", max_new_tokens=60, temperature=1.0, seed=5, n=4)
    prompt = [MASK, "a <mask> circle <mask>"]
    [r] = engine.generate([prompt], params)
    for s in r.samples:
        ids = s.token_ids
        assert all(v.is_image(t) for t in ids[:tpi]) and ids[tpi] == v.sentinel(1)
        assert len(s.infilled) == 3 and len(s.images) == 1
        assert s.infilled[0] is s.images[0] and s.infilled[0].size == (16, 16)
        assert all(isinstance(x, str) for x in s.infilled[1:])
        assert s.text.startswith("a") and " circle" in s.text or s.finish_reason == "length"
        if s.finish_reason == "eos":
            assert ids.count(v.sentinel(2)) == 1 and ids[-1] == v.eos


@pytest.mark.parametrize("seed", range(4))
def test_budget_never_cuts_an_image_span(engine, seed):
    v, tpi = engine.vocab, engine.tokens_per_image
    params = SamplingParams(modality="text", max_new_tokens=2 * tpi + 4, temperature=1.0, seed=seed)
    [r] = engine.generate([["a <mask> circle", MASK, "and <mask>", MASK]], params)
    s = r.samples[0]
    assert len(s.images) == 2 and all(isinstance(x, Image.Image) for x in s.infilled[1::2])
    assert len(s.token_ids) <= 2 * tpi + 4 and s.token_ids[-1] == v.eos


def test_infill_with_guidance_in_the_image_span(engine):
    params = SamplingParams(modality="text", max_new_tokens=40, cfg_scale=3.0, seed=1)
    [r] = engine.generate([["a red circle", None]], params)
    assert len(r.samples[0].images) == 1


@pytest.mark.slow
def test_infill_rate_on_a_trained_run():
    """ENGINE_INFILL_RUN=runs/tiny: a trained model recovers masked caption words more often
    than chance (1 / the number of words that can fill the slot)."""
    run = os.environ.get("ENGINE_INFILL_RUN")
    if not run or not (Path(run) / "config.json").is_file():
        pytest.skip("set ENGINE_INFILL_RUN to a trained run directory")
    from engine.eval.infill_rate import measure
    report = measure(run, n_captions=48, seed=0)
    assert report["rate"] > 2 * report["chance"], report


def test_infill_cases_skip_captions_that_do_not_name_both_words():
    from engine.eval.infill_rate import _cases
    captions = ["a red star", "a star", "a red shape", "a big blue circle on the left"]
    cases = list(_cases(captions, {"red", "blue"}, {"star", "circle"}))
    assert [i for i, *_ in cases] == [0, 3]
    assert cases[0][1] == "a<mask> star" and cases[0][2] == "red"
    assert cases[1][2] == "circle" and "<mask>" in cases[1][1]
