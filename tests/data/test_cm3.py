"""Property tests of the CM3 transform (hypothesis) and of CFG condition dropout."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.cm3 import cm3_transform, drop_condition, join_segments, split_segments, undo_cm3
from engine.data.packing import IGNORE, Packer
from engine.tokenizer.vocab import Vocab

V = Vocab(text_size=300, image_codes=64, num_sentinels=16)
text_tok = st.integers(V.bpe_start, V.image_start - 1)
image_tok = st.integers(V.image_start, V.size - 1)
segment = st.one_of(st.lists(text_tok, min_size=1, max_size=12),
                    st.lists(image_tok, min_size=1, max_size=20), st.just([V.mask]))
documents = st.lists(segment, min_size=1, max_size=5).map(lambda segs: join_segments(segs, V))


def spans_of(seq):
    """The appended spans: [(sentinel, tokens)] after the first repeated sentinel."""
    seen, tail_at = set(), None
    for j, t in enumerate(seq):
        if V.is_sentinel(t):
            if t in seen:
                tail_at = j
                break
            seen.add(t)
    spans, cur = [], None
    for t in seq[tail_at:] if tail_at is not None else []:
        if V.is_sentinel(t):
            cur = [t, []]
            spans.append(cur)
        else:
            cur[1].append(t)
    return spans


@settings(max_examples=300, deadline=None)
@given(documents, st.integers(0, 2**32 - 1))
def test_original_is_recovered(body, seed):
    out = cm3_transform(body, V, np.random.default_rng(seed))
    assert undo_cm3(out, V) == body


@settings(max_examples=300, deadline=None)
@given(documents, st.integers(0, 2**32 - 1))
def test_spans_never_cross_break_and_sentinels_are_ordered(body, seed):
    out = cm3_transform(body, V, np.random.default_rng(seed))
    spans = spans_of(out)
    if any(t >= V.bpe_start for t in body):
        assert 1 <= len(spans) <= 16
    for i, (sentinel, toks) in enumerate(spans):
        assert sentinel == V.sentinel(i)
        assert toks and V.brk not in toks
        # one modality per span: a span lies inside one segment
        assert len({V.is_image(t) for t in toks}) == 1
    # the body keeps every <break> and each sentinel once, in order
    head = out[:len(out) - sum(len(t) + 1 for _, t in spans)]
    assert head.count(V.brk) == body.count(V.brk)
    assert [t for t in head if V.is_sentinel(t)] == [V.sentinel(i) for i in range(len(spans))]


@settings(max_examples=100, deadline=None)
@given(st.lists(documents, min_size=1, max_size=6), st.integers(0, 2**32 - 1))
def test_sentinels_carry_no_loss_after_packing(bodies, seed):
    rng = np.random.default_rng(seed)
    docs = [[V.bos] + cm3_transform(b, V, rng) + [V.eos] for b in bodies]
    packer = Packer(itertools.cycle(docs), V, seq_len=128)
    batch = packer.next_batch(3)
    t = batch.targets[batch.targets != IGNORE]
    assert not any(V.is_sentinel(int(x)) for x in t)
    assert batch.cu_seqlens[0] == 0 and batch.cu_seqlens[-1] == 3 * 128


def test_span_count_follows_clamped_poisson():
    body = join_segments([[V.bpe_start + i % 50 for i in range(40)],
                          [V.image_start + i for i in range(60)]], V)
    rng = np.random.default_rng(0)
    counts = [len(spans_of(cm3_transform(body, V, rng))) for _ in range(4000)]
    counts = np.bincount(counts, minlength=6)
    # P(n=1) = P(Poisson(1) <= 1) = 2/e ~ 0.736. Draws of 3+ spans can lose one to the
    # overlap retries on this two-segment document, so only "2 or more" is checked.
    assert abs(counts[1] / 4000 - 0.736) < 0.03
    assert abs(counts[2:].sum() / 4000 - 0.264) < 0.03
    assert counts[0] == 0


def test_condition_dropout_rate_and_form():
    cap, img = [V.bpe_start + 3, V.bpe_start + 4], [V.image_start + 1] * 4
    rng = np.random.default_rng(0)
    out = [drop_condition([cap, img], V, 0.1, rng) for _ in range(5000)]
    dropped = sum(o[0] == [V.mask] for o in out)
    assert 400 < dropped < 600
    assert all(o[1] == img for o in out)
    # an image-first document (captioning) keeps its caption
    assert all(drop_condition([img, cap], V, 1.0, rng) == [img, cap] for _ in range(10))


def test_split_join_round_trip():
    body = [V.bpe_start, V.brk, V.image_start, V.image_start + 1, V.brk, V.bpe_start + 2]
    assert join_segments(split_segments(body, V), V) == body


@pytest.mark.parametrize("weighting, share", [("uniform", 1 / 2), ("length", 10 / 70)])
def test_span_segment_weighting(weighting, share):
    # A 10-token caption before a 60-code image: single-span draws land in the caption half
    # the time when segments are drawn uniformly, 10 / 70 of the time by length.
    caption, image = [V.bpe_start + i for i in range(10)], [V.image_start + i for i in range(60)]
    body = join_segments([caption, image], V)
    rng = np.random.default_rng(0)
    in_caption = single = 0
    for _ in range(6000):
        out = cm3_transform(body, V, rng, span_segments=weighting)
        assert undo_cm3(out, V) == body
        spans = spans_of(out)
        if len(spans) == 1:
            single += 1
            in_caption += not V.is_image(spans[0][1][0])
    assert abs(in_caption / single - share) < 0.02


def test_unknown_span_segments_is_refused():
    with pytest.raises(ValueError, match="span_segments"):
        cm3_transform([V.bpe_start], V, np.random.default_rng(0), span_segments="sqrt")
