import itertools

import numpy as np
import pytest
import torch

from engine.data.packing import IGNORE, Packer
from engine.ops.attention import document_ids
from engine.tokenizer.vocab import Vocab

V = Vocab(text_size=300, image_codes=64, num_sentinels=16)


def doc(n, start=30):
    return [V.bos] + list(range(start, start + n - 2)) + [V.eos]


def test_documents_never_split_and_positions_restart():
    docs = iter([doc(10), doc(7), doc(12), doc(5), doc(9)] * 10)
    b = Packer(docs, V, seq_len=24).next_batch(3)
    ids = document_ids(b.cu_seqlens, 3, 24)
    for row in range(3):
        for d in ids[row].unique():
            sel = ids[row] == d
            pos = b.positions[row][sel]
            assert torch.equal(pos, torch.arange(int(sel.sum())))
    # the first row holds 10 + 7 tokens; 12 would not fit, so it starts row 2
    assert b.ids[0, :10].tolist() == doc(10) and b.ids[0, 10:17].tolist() == doc(7)
    assert (b.ids[0, 17:] == V.pad).all() and (b.targets[0, 16:] == IGNORE).all()
    assert b.ids[1, :12].tolist() == doc(12)


def test_targets_are_next_tokens_within_a_document():
    b = Packer(iter([doc(6)] * 10), V, seq_len=12).next_batch(1)
    assert b.targets[0, :6].tolist() == doc(6)[1:] + [IGNORE]
    assert b.targets[0, 6:12].tolist() == doc(6)[1:] + [IGNORE]


def test_sentinel_targets_ignored_and_long_documents_skipped():
    s = V.sentinel(0)
    long = list(range(30, 60))
    packer = Packer(iter([long, [V.bos, 40, s, 41, s, 42, V.eos]] * 3), V, seq_len=16)
    b = packer.next_batch(1)
    assert b.targets[0, :7].tolist() == [40, IGNORE, 41, IGNORE, 42, V.eos, IGNORE]
    assert packer.skipped >= 1


def _reference_rows(docs, seq_len, batch_size):
    """Plain per-document packing: (ids, targets, positions) row by row."""
    rows, pending = [], None
    for _ in range(batch_size):
        ids, tgt, pos = [], [], []
        while True:
            d = pending if pending is not None else next(docs)
            pending = None
            if len(ids) + len(d) > seq_len:
                pending = d
                break
            ids += d
            tgt += [IGNORE if V.is_sentinel(t) else t for t in d[1:]] + [IGNORE]
            pos += list(range(len(d)))
        pad = seq_len - len(ids)
        rows.append((ids + [V.pad] * pad, tgt + [IGNORE] * pad, pos + list(range(pad))))
    return rows


def test_batch_matches_a_per_document_reference():
    rng = np.random.default_rng(0)
    pool = [V.sentinel(0), V.sentinel(3)] + list(range(V.bpe_start, V.bpe_start + 40))

    def random_docs():
        while True:
            n = int(rng.integers(1, 20))
            yield [V.bos] + [int(t) for t in rng.choice(pool, n)] + [V.eos]

    seed_docs = list(itertools.islice(random_docs(), 400))
    b = Packer(iter(seed_docs), V, seq_len=32).next_batch(6)
    for row, (ids, tgt, pos) in enumerate(_reference_rows(iter(seed_docs), 32, 6)):
        assert b.ids[row].tolist() == ids
        assert b.targets[row].tolist() == tgt
        assert b.positions[row].tolist() == pos


def test_long_rows_hold_more_documents_of_at_most_seq_len():
    rng = np.random.default_rng(1)
    docs = [[V.bos] + list(range(30, 30 + int(n))) + [V.eos] for n in rng.integers(5, 30, 300)]
    docs.insert(3, doc(40))                  # longer than seq_len 32: skipped though it fits
    packer = Packer(iter(docs), V, seq_len=32, row_len=200)
    b = packer.next_batch(2)
    assert b.ids.shape == (2, 200) and packer.skipped == 1
    want = [d for d in docs if len(d) <= 32]
    for row, (ids, tgt, pos) in enumerate(_reference_rows(iter(want), 200, 2)):
        assert b.ids[row].tolist() == ids
        assert b.targets[row].tolist() == tgt
        assert b.positions[row].tolist() == pos
    # Every position, the padding tail's too, stays below seq_len (the model checks it).
    assert int(b.positions.max()) < 32 and (b.ids[0, :150] != V.pad).all()
    lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
    assert max(lengths) <= 200 and sum(lengths) == 400


def test_row_shorter_than_a_document_is_refused():
    with pytest.raises(ValueError, match="row_len"):
        Packer(iter([doc(5)]), V, seq_len=32, row_len=16)
