"""The CM3 causal-masking transform and CFG condition dropout.

CM3 (DESIGN.md): draw n ~ clamp(Poisson(1), 1, max_spans) non-overlapping spans, never
across <break>; replace span i by the sentinel <mask:i> in place and append "<mask:i> span"
after the body, so the model learns infilling while still training left to right:

    body:         A B C <break> D E F G
    transformed:  A <mask:0> <break> D E <mask:1> G <mask:0> B C <mask:1> F

The sentinels themselves get no loss (engine.data.packing ignores every target that is a
sentinel). Our choices where the paper is silent: a span's segment is drawn among the
segments that hold maskable (BPE or image) tokens, uniformly or in proportion to its length
(`span_segments`), the span's length uniformly in [1, segment length], its start
uniformly; a draw that would overlap an earlier span is retried, and given up after a few
tries (so n is an upper bound on tight documents).

Where the spans fall, and what is trained after them, decides held-out colour-shape pairs
(tiny preset, seeds 0-3, CFG 3; bench/results/tiny_span_placement_cpu-epyc-2core.json).
Plain CM3 ("uniform" segments, loss on every target but the sentinels) holes the ~10-token
caption of ~3 in 5 text-to-image documents, and the image after it is trained as
"a <mask:0> star" -> the colours stars come in: the prior a held-out pair like "a red star"
must overcome (held-out-pair colour 62/75/62/62%, caption infilling 64-88% recovered).
Three switches, all on in the tiny preset:
  - span_segments="length": a segment in proportion to its length (a caption span in ~1
    document in 4). Alone: held-out colour 74/70/80/76%, but caption infilling falls to
    chance (12-20%): the model repeats neighbouring words instead of ending the span.
  - DataConfig.caption_only_prob = 0.2 (engine/data/corpus.py): caption-only documents bring
    infilling back (57-64%) and keep held-out colour (67/85/77/73%).
  - TrainConfig.image_loss_after_caption_span = False (images_after_caption_spans below):
    the image after a holed caption is context, not a target. With the other two: held-out
    colour 77/83/81/84% (mean 81%), trained-pair colour+shape 89-93% (plain: 83-89%),
    caption infilling 54-61% (chance 18%).
Where infilling matters more: uniform segments with the other two (2 seeds) infill 82-88%
with held-out colour 75/81%, but trained-pair colour+shape falls to 73-78%. Square-root
weighting (2 seeds) kept neither: held-out colour 65%, infilling 65%.
"""
from __future__ import annotations

import numpy as np

from engine.config import SPAN_SEGMENTS
from engine.tokenizer.vocab import Vocab

_RETRIES = 8


def split_segments(body: list[int], vocab: Vocab) -> list[list[int]]:
    segs: list[list[int]] = [[]]
    for t in body:
        if t == vocab.brk:
            segs.append([])
        else:
            segs[-1].append(t)
    return segs


def join_segments(segs: list[list[int]], vocab: Vocab) -> list[int]:
    out: list[int] = []
    for i, s in enumerate(segs):
        if i:
            out.append(vocab.brk)
        out += s
    return out


def drop_condition(segs: list[list[int]], vocab: Vocab, p: float, rng: np.random.Generator) -> list[list[int]]:
    """CFG training: with probability p, a caption that precedes an image becomes <mask>."""
    if len(segs) >= 2 and segs[0] and not vocab.is_image(segs[0][0]) \
            and any(s and vocab.is_image(s[0]) for s in segs[1:]) and rng.random() < p:
        return [[vocab.mask]] + segs[1:]
    return segs


def _maskable(seg: list[int], vocab: Vocab) -> bool:
    return any(t >= vocab.bpe_start for t in seg)


def cm3_transform(body: list[int], vocab: Vocab, rng: np.random.Generator,
                  max_spans: int = 16, span_segments: str = "uniform") -> list[int]:
    """body = a document's ids between <bos> and <eos>. Returns the transformed body."""
    if span_segments not in SPAN_SEGMENTS:
        raise ValueError(f"unknown span_segments {span_segments!r}; choose one of: "
                         f"{', '.join(SPAN_SEGMENTS)}")
    max_spans = min(max_spans, vocab.num_sentinels)
    segs = split_segments(body, vocab)
    offsets = np.cumsum([0] + [len(s) + 1 for s in segs[:-1]])   # start of each segment in body
    candidates = [i for i, s in enumerate(segs) if _maskable(s, vocab)]
    if not candidates:
        return list(body)
    weights = None
    if span_segments == "length":
        weights = np.array([len(segs[i]) for i in candidates], dtype=np.float64)
        weights /= weights.sum()
    n = int(np.clip(rng.poisson(1.0), 1, max_spans))
    spans: list[tuple[int, int]] = []       # [start, end) in body coordinates
    for _ in range(n):
        for _ in range(_RETRIES):
            # rng.integers for "uniform" keeps its draws what they were before the option.
            pick = rng.integers(len(candidates)) if weights is None else \
                rng.choice(len(candidates), p=weights)
            seg = candidates[pick]
            length = int(rng.integers(1, len(segs[seg]) + 1))
            start = int(offsets[seg] + rng.integers(0, len(segs[seg]) - length + 1))
            end = start + length
            if all(end <= s or start >= e for s, e in spans):
                spans.append((start, end))
                break
    spans.sort()
    out, tail, pos = [], [], 0
    for i, (s, e) in enumerate(spans):
        sentinel = vocab.sentinel(i)
        out += body[pos:s] + [sentinel]
        tail += [sentinel] + body[s:e]
        pos = e
    return out + body[pos:] + tail


def _tail_start(seq: list[int], vocab: Vocab) -> int | None:
    """Index where the appended "<mask:i> span" tail starts: the first repeated sentinel."""
    seen: set[int] = set()
    for j, t in enumerate(seq):
        if vocab.is_sentinel(t):
            if t in seen:
                return j
            seen.add(t)
    return None


def images_after_caption_spans(doc: list[int], vocab: Vocab) -> list[tuple[int, int]]:
    """[start, end) ranges of a transformed document (<bos> ... <eos>) holding the in-place
    image codes of every image segment that directly follows a caption with a CM3 span in it.

    Such an image is the context its caption's infill is read from; trained as a target it
    teaches "a <mask:0> star" -> the colours stars come in, the prior that a held-out pair
    like "a red star" must overcome (TrainConfig.image_loss_after_caption_span). A caption is
    a segment with no image code; one masked whole is the bare sentinel."""
    head_end = _tail_start(doc, vocab)
    if head_end is None:
        return []
    ranges: list[tuple[int, int]] = []
    holed_caption, start = False, 0
    for seg in split_segments(doc[:head_end], vocab):
        images = [k for k, t in enumerate(seg, start) if vocab.is_image(t)]
        if holed_caption and images:
            ranges.append((images[0], images[-1] + 1))
        holed_caption = not images and any(vocab.is_sentinel(t) for t in seg)
        start += len(seg) + 1                 # the segment and its <break>
    return ranges


def undo_cm3(seq: list[int], vocab: Vocab) -> list[int]:
    """Inverse of cm3_transform: splice every appended span back at its sentinel."""
    first_tail = _tail_start(seq, vocab)
    if first_tail is None:
        return list(seq)
    head, tail = seq[:first_tail], seq[first_tail:]
    spans: dict[int, list[int]] = {}
    current = None
    for t in tail:
        if vocab.is_sentinel(t):
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in head:
        out += spans.get(t, []) if vocab.is_sentinel(t) else [t]
    return out
