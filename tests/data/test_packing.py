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
