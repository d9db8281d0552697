"""Caption-only training documents (data.caption_only_prob): their share, their form, and a
clear refusal of a probability outside [0, 1]. That 0 leaves the stream as it was is checked
by tests/retrieval/test_augmented_documents.py::test_no_retrieval_path_is_unchanged."""
import numpy as np
import pytest
import torch

from engine.config import DataConfig, TrainConfig, VocabConfig
from engine.data.cm3 import undo_cm3
from engine.data.corpus import EncodedCorpus, document_stream
from engine.tokenizer.vocab import Vocab

V = Vocab.from_config(VocabConfig(text_size=1024, image_codes=512))


def corpus(n=20):
    rng = np.random.default_rng(1)
    caps = [list(map(int, rng.integers(V.bpe_start, 1024, size=int(rng.integers(3, 12)))))
            for _ in range(n)]
    return EncodedCorpus(caps, torch.from_numpy(rng.integers(0, 512, size=(n, 16))))


@pytest.mark.parametrize("span_segments", ["uniform", "length"])
def test_share_and_form_of_caption_only_documents(span_segments):
    c = corpus()
    train = TrainConfig(cfg_dropout=0.0, span_segments=span_segments)
    stream = document_stream(c, V, train, DataConfig(caption_only_prob=0.25), seed=5)
    captions = {tuple(x) for x in c.captions}
    n, alone = 4000, 0
    for _ in range(n):
        doc = next(stream)
        assert doc[0] == V.bos and doc[-1] == V.eos
        body = undo_cm3(doc[1:-1], V)
        if any(V.is_image(t) for t in body):
            assert V.brk in body
            continue
        alone += 1
        assert tuple(body) in captions                      # the whole caption, nothing else
        assert any(V.is_sentinel(t) for t in doc)           # and it carries a CM3 span
    assert abs(alone / n - 0.25) < 0.03


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_probability_outside_unit_interval_is_refused(p):
    with pytest.raises(ValueError, match="caption_only_prob"):
        DataConfig(caption_only_prob=p)
