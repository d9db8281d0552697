"""Modality constraints: unit cases on the state machine, then fuzzing through the engine."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.inference.constraints import SequenceConstraints
from engine.inference.params import SamplingParams
from engine.inference.prompts import InfillSpan


def _spans_ok(eng, ids: list[int], prompt_last: int) -> list[list[int]]:
    """Checks the generated ids' image spans; returns them."""
    v, tpi = eng.vocab, eng.tokens_per_image
    spans, i, prev = [], 0, prompt_last
    while i < len(ids):
        if v.is_image(ids[i]):
            assert prev == v.brk or v.is_sentinel(prev), "an image span opened without <break>"
            run = ids[i:i + tpi]
            assert len(run) == tpi and all(v.is_image(t) for t in run), "short image span"
            after = ids[i + tpi:i + tpi + 1]
            assert not after or not v.is_image(after[0]), "image span longer than tokens_per_image"
            spans.append(run)
            prev, i = run[-1], i + tpi
        else:
            assert ids[i] not in (v.pad, v.bos, v.mask)
            prev, i = ids[i], i + 1
    return spans


def test_image_span_then_break_or_eos():
    from engine.config import get_preset
    from engine.tokenizer.vocab import Vocab
    v = Vocab.from_config(get_preset("tiny").vocab)
    c = SequenceConstraints(v, 4, "text", budget=20, last_prompt_token=v.bpe_start)
    assert c.allowed() == (v.eos, v.image_start)          # no image without a <break>
    c.push(v.brk)
    assert c.allowed() == (v.eos, v.size)                  # a span may open
    c.push(v.image_token(5))
    for _ in range(3):
        assert c.allowed() == (v.image_start, v.size)
        c.push(v.image_token(1))
    assert c.allowed() == (v.eos, v.brk + 1)               # closes with <break> or <eos>
    c.push(v.brk)
    c2 = SequenceConstraints(v, 4, "text", budget=4, last_prompt_token=v.brk)
    c2.push(v.bpe_start)
    c2.push(v.brk)
    assert c2.allowed() == (v.eos, v.image_start)          # 2 tokens left: no room for a span
    c.push(v.eos)
    assert c.done and c.finish_reason == "eos"


def test_infill_markers_are_substituted_and_image_spans_forced():
    from engine.config import get_preset
    from engine.tokenizer.vocab import Vocab
    v = Vocab.from_config(get_preset("tiny").vocab)
    spans = [InfillSpan("text", v.sentinel(0)), InfillSpan("image", v.sentinel(1))]
    c = SequenceConstraints(v, 2, "text", budget=50, spans=spans)
    c.push(c.choose(v.bpe_start + 3)[0])
    tok, forced = c.choose(v.sentinel(7))                  # wrong sentinel ends the span ...
    assert tok == v.sentinel(1) and not forced             # ... and becomes the right one
    c.push(tok)
    assert c.in_image
    c.push(v.image_token(0))
    c.push(v.image_token(1))
    assert c.next_forced() == v.eos
    tok, forced = c.choose(v.image_token(3))
    assert (tok, forced) == (v.eos, True)
    c.push(tok)
    assert c.done


_words = st.sampled_from(["a", "red", "blue", "circle", "square", "on", "the", "left", "?", "make"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(_words, min_size=1, max_size=6),
       with_image=st.sampled_from(["none", "first", "last"]),
       modality=st.sampled_from(["image", "text"]),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
       top_p=st.sampled_from([0.5, 0.9, 1.0]),
       top_k=st.sampled_from([0, 1, 5, 100]),
       guidance=st.sampled_from([(1.0, None, None), (3.0, None, None), (0.0, None, None),
                                 (2.0, None, (0.1, 4)), (2.0, 1.5, None)]),
       n=st.integers(1, 3),
       max_new=st.integers(1, 60),
       seed=st.integers(0, 2**16))
def test_fuzz_image_spans_are_exact_and_decode(engine, words, with_image, modality, temperature,
                                               top_p, top_k, guidance, n, max_new, seed):
    cfg, image_cfg, cd_k = guidance
    image = Image.new("RGB", (20, 12), (seed % 255, 90, 200))
    prompt = {"none": [" ".join(words)], "first": [image, " ".join(words)],
              "last": [" ".join(words), image]}[with_image]
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, cfg_scale=cfg,
                            image_cfg_scale=image_cfg, cd_k=cd_k, n=n, seed=seed,
                            modality=modality, max_new_tokens=max_new if modality == "text" else None)
    [r] = engine.generate([prompt], params)
    assert len(r.samples) == n
    for s in r.samples:
        spans = _spans_ok(engine, s.token_ids, r.prompt_ids[-1])
        assert len(s.images) == len(spans) == len(s.image_codes)
        assert all(im.size == (16, 16) for im in s.images)
        assert len(s.logprobs) == len(s.token_ids)
        if modality == "image":
            assert len(spans) == 1 and len(s.token_ids) == engine.tokens_per_image
        else:
            assert len(s.token_ids) <= max_new


def test_text_mode_opens_image_spans_somewhere(engine):
    """The fuzz above is only meaningful if text mode really opens spans; with these random
    weights and enough room it does."""
    params = SamplingParams(temperature=1.5, top_p=1.0, cfg_scale=1.0, modality="text",
                            max_new_tokens=60, n=16, seed=1)
    [r] = engine.generate([["a red circle", Image.new("RGB", (16, 16))]], params)
    opened = [s for s in r.samples if s.images]
    assert opened, "no sample opened an image span"
    for s in opened:
        _spans_ok(engine, s.token_ids, r.prompt_ids[-1])
