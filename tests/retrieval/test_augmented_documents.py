"""Retrieval-augmented training documents: the layout, CFG dropout, and the untouched
no-retrieval path (byte-for-byte the pre-retrieval implementation, RNG draws included)."""
import numpy as np

from engine.config import DataConfig, TrainConfig, VocabConfig
from engine.data.cm3 import cm3_transform, drop_condition, join_segments, undo_cm3
from engine.data.corpus import EncodedCorpus, build_document, document_stream
from engine.tokenizer.vocab import Vocab
import torch

V = Vocab.from_config(VocabConfig(text_size=1024, image_codes=512))
TRAIN, DATA = TrainConfig(), DataConfig()


def old_build_document(caption, codes, vocab, train, data, rng):
    image = [vocab.image_token(int(c)) for c in codes]
    segs = [image, caption] if rng.random() < data.image_first_prob else [caption, image]
    segs = drop_condition(segs, vocab, train.cfg_dropout, rng)
    body = cm3_transform(join_segments(segs, vocab), vocab, rng, train.max_spans)
    return [vocab.bos] + body + [vocab.eos]


def corpus(n=20):
    rng = np.random.default_rng(0)
    caps = [list(map(int, rng.integers(V.bpe_start, 1024, size=int(rng.integers(2, 9))))) for _ in range(n)]
    return EncodedCorpus(caps, torch.from_numpy(rng.integers(0, 512, size=(n, 16))))


def test_no_retrieval_path_is_unchanged():
    c = corpus()
    for seed in range(30):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        for i in range(5):
            assert build_document(c.captions[i], c.codes[i].tolist(), V, TRAIN, DATA, r1) == \
                old_build_document(c.captions[i], c.codes[i].tolist(), V, TRAIN, DATA, r2)
    new, old = document_stream(c, V, TRAIN, DATA, 7), np.random.default_rng(7)
    for _ in range(50):
        i = int(old.integers(len(c)))
        assert next(new) == old_build_document(c.captions[i], c.codes[i].tolist(), V, TRAIN, DATA, old)


def test_layout_before_cm3():
    c = corpus()
    no_mask = TrainConfig(cfg_dropout=0.0)
    text_first = DataConfig(image_first_prob=0.0)
    img = lambda i: [V.image_token(int(x)) for x in c.codes[i]]
    want = (c.captions[1] + [V.brk] + img(1) + [V.brk, V.eos, V.brk] + c.captions[2] + [V.brk]
            + img(2) + [V.brk, V.eos, V.brk] + c.captions[0] + [V.brk] + img(0))
    for seed in range(20):
        doc = build_document(c.captions[0], c.codes[0].tolist(), V, no_mask, text_first,
                             np.random.default_rng(seed),
                             [(c.captions[j], c.codes[j].tolist()) for j in (1, 2)])
        assert doc[0] == V.bos and doc[-1] == V.eos
        assert undo_cm3(doc[1:-1], V) == want


def test_condition_dropout_drops_the_retrieved_documents_too():
    c = corpus()
    always = TrainConfig(cfg_dropout=1.0)
    text_first = DataConfig(image_first_prob=0.0)
    doc = build_document(c.captions[0], c.codes[0].tolist(), V, always, text_first,
                         np.random.default_rng(0), [(c.captions[1], c.codes[1].tolist())])
    body = undo_cm3(doc[1:-1], V)
    assert body == [V.mask, V.brk] + [V.image_token(int(x)) for x in c.codes[0]]


def test_stream_uses_neighbours_and_skips_missing():
    c = corpus()
    nb = np.full((len(c), 2), -1)
    nb[:, 0] = (np.arange(len(c)) + 1) % len(c)
    stream = document_stream(c, V, TrainConfig(cfg_dropout=0.0), DataConfig(image_first_prob=0.0), 3, nb)
    img = lambda i: [V.image_token(int(x)) for x in c.codes[i]]
    for _ in range(20):
        body = undo_cm3(next(stream)[1:-1], V)
        assert body.count(V.eos) == 1
        cut = body.index(V.eos)
        prefix, query = body[:cut - 1], body[cut + 2:]
        i = next(i for i in range(len(c)) if query == c.captions[i] + [V.brk] + img(i))
        j = (i + 1) % len(c)
        assert prefix == c.captions[j] + [V.brk] + img(j)
