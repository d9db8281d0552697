"""The image after a caption holding a CM3 span as context only
(train.image_loss_after_caption_span=False): which tokens, and that the packer drops exactly
their targets (exactly so on a hand-built row)."""
import numpy as np
import torch

from engine.config import DataConfig, TrainConfig, VocabConfig
from engine.data.cm3 import images_after_caption_spans
from engine.data.corpus import EncodedCorpus, document_stream
from engine.data.packing import IGNORE, Packer
from engine.tokenizer.vocab import Vocab

V = Vocab.from_config(VocabConfig(text_size=1024, image_codes=512))
IMG = [V.image_token(k) for k in (7, 8, 9, 10)]
W = [V.bpe_start + k for k in range(6)]
S0, S1 = V.sentinel(0), V.sentinel(1)


def test_image_after_a_holed_caption():
    doc = [V.bos, W[0], S0, V.brk] + IMG + [S0, W[1], V.eos]
    assert images_after_caption_spans(doc, V) == [(4, 8)]


def test_caption_masked_whole_counts_as_holed():
    doc = [V.bos, S0, V.brk] + IMG + [S0, W[0], W[1], V.eos]
    assert images_after_caption_spans(doc, V) == [(3, 7)]


def test_hole_in_the_image_too_keeps_the_range_to_the_in_place_codes():
    doc = [V.bos, S0, V.brk] + IMG[:2] + [S1] + IMG[3:] + [S0, W[0], S1, IMG[2], V.eos]
    assert images_after_caption_spans(doc, V) == [(3, 7)]     # the tail's code keeps its loss


def test_untouched_cases():
    span_in_image = [V.bos, W[0], W[1], V.brk] + IMG[:1] + [S0] + IMG[2:] + [S0, IMG[1], V.eos]
    image_first = [V.bos] + IMG + [V.brk, W[0], S0, S0, W[1], V.eos]        # captioning
    dropped = [V.bos, V.mask, V.brk] + IMG[:1] + [S0] + [S0] + IMG[1:] + [V.eos]
    caption_only = [V.bos, W[0], S0, S0, W[1], V.eos]
    for doc in (span_in_image, image_first, dropped, caption_only):
        assert images_after_caption_spans(doc, V) == []


def test_retrieved_documents_each_judged_by_their_own_caption():
    doc = ([V.bos, W[0], S0, V.brk] + IMG + [V.brk, V.eos, V.brk, W[2], V.brk] + IMG
           + [S0, W[1], V.eos])
    assert images_after_caption_spans(doc, V) == [(4, 8)]


def test_packer_drops_only_image_targets_on_a_real_stream():
    rng = np.random.default_rng(0)
    caps = [list(map(int, rng.integers(V.bpe_start, 1024, size=int(rng.integers(3, 10)))))
            for _ in range(30)]
    corpus = EncodedCorpus(caps, torch.from_numpy(rng.integers(0, 512, size=(30, 16))))
    train, data = TrainConfig(), DataConfig()
    plain = Packer(document_stream(corpus, V, train, data, 4), V, seq_len=64)
    context = Packer(document_stream(corpus, V, train, data, 4), V, seq_len=64,
                     context_only=lambda d: images_after_caption_spans(d, V))
    dropped = 0
    for _ in range(10):
        a, b = plain.next_batch(8), context.next_batch(8)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.positions, b.positions)
        changed = a.targets != b.targets
        assert (b.targets[changed] == IGNORE).all()
        # every dropped target is an in-place image code
        assert all(V.is_image(int(t)) for t in a.targets[changed])
        dropped += int(changed.sum())
    assert dropped > 0


def test_packer_context_targets_on_a_known_row():
    holed = [V.bos, W[0], S0, V.brk] + IMG + [S0, W[1], V.eos]      # image at 4..7
    plain = [V.bos, W[2], V.brk] + IMG + [V.eos]
    docs = iter([holed, plain, [V.bos] * 20])                        # the last waits for row 2
    b = Packer(docs, V, seq_len=32, context_only=lambda d: images_after_caption_spans(d, V))
    t = b.next_batch(1).targets[0].tolist()
    want = holed[1:] + [IGNORE] + plain[1:] + [IGNORE] + [IGNORE] * (32 - len(holed) - len(plain))
    want[1] = want[7] = IGNORE       # the targets that are sentinels
    for j in range(3, 7):            # positions 3..6 predict the in-place codes at 4..7
        want[j] = IGNORE
    assert t == want
