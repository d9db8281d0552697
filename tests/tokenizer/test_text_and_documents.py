import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.document import DocumentTokenizer, ImageSegment, TextSegment
from engine.tokenizer.vocab import Vocab

V = Vocab(text_size=600, image_codes=64, num_sentinels=16)
CORPUS = ["a red circle in the top left", "a small blue square", "a green star and a purple triangle",
          "the quick brown fox jumps over the lazy dog"] * 50


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.train(CORPUS, V)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_text_round_trip_is_exact(bpe, text):
    ids = bpe.encode(text)
    assert all(V.bpe_start <= i < V.image_start for i in ids)
    assert bpe.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(caption=st.text(min_size=1, max_size=30),
       codes=st.lists(st.integers(0, V.image_codes - 1), min_size=16, max_size=16),
       image_first=st.booleans())
def test_document_round_trip(bpe, caption, codes, image_first):
    tok = DocumentTokenizer(V, bpe, tokens_per_image=16)
    doc = [TextSegment(caption), ImageSegment(codes=tuple(codes))]
    if image_first:
        doc.reverse()
    ids = tok.encode(doc)
    assert ids[0] == V.bos and ids[-1] == V.eos and ids.count(V.brk) == 1
    back = tok.decode(ids)
    assert len(back) == 2
    img = back[0] if image_first else back[1]
    txt = back[1] if image_first else back[0]
    assert img.codes == tuple(codes) and txt.text == caption


def test_bad_image_segments_raise(bpe):
    tok = DocumentTokenizer(V, bpe, tokens_per_image=16)
    with pytest.raises(ValueError, match="expected 16"):
        tok.encode([ImageSegment(codes=(1, 2, 3))])
    with pytest.raises(ValueError, match="image codes"):
        tok.encode([ImageSegment(codes=(V.image_codes,) * 16)])
    with pytest.raises(ValueError, match="empty"):
        tok.encode([])


def test_specials_inside_text_are_named(bpe):
    tok = DocumentTokenizer(V, bpe)
    ids = [V.bos] + bpe.encode("a ") + [V.mask] + bpe.encode(" circle") + [V.eos]
    assert tok.decode(ids)[0].text == "a <mask> circle"
