"""The dual encoder: normalised embeddings, document averaging, recall on the synthetic
concepts, the re-ranker score(), save/load."""
import pytest
import torch
import torch.nn.functional as F

from engine.retrieval.dual_encoder import DualEncoder
from engine.retrieval.encoder_training import info_nce
from engine.retrieval.recall import caption_image_recall, matches


def test_embeddings_are_unit_and_documents_average_the_towers(corpus, encoder):
    data, _ = corpus
    t = encoder.encode_documents(captions=data.captions[:10])
    i = encoder.encode_documents(codes=data.codes[:10])
    d = encoder.encode_documents(data.captions[:10], data.codes[:10])
    assert torch.allclose(t.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(d, F.normalize((t + i) / 2, dim=1), atol=1e-5)


def test_trained_encoder_pairs_captions_with_their_images(corpus, encoder):
    data, concept = corpus
    objects = [((f"c{c}", "s", "p"),) for c in concept]
    r = caption_image_recall(encoder, data.captions, data.codes, [""] * len(concept), objects)
    assert r["recall@1"] > 0.8


def test_multi_positive_info_nce_ignores_same_caption_negatives():
    a = F.normalize(torch.randn(4, 8), dim=1)
    keys = torch.tensor([0, 0, 1, 2])
    swapped = a[[1, 0, 2, 3]]      # rows 0 and 1 share a caption: swapping them costs nothing
    scale = torch.tensor(10.0)
    assert torch.isclose(info_nce(a, a, scale, keys), info_nce(a, swapped, scale, keys), atol=1e-6)


def test_recall_counts_any_matching_image():
    assert matches("a red circle", [("red", "circle", "top")], [("red", "circle", "left")])
    assert not matches("a red circle at the top", [("red", "circle", "top")], [("red", "circle", "left")])
    assert not matches("a red circle", [("red", "circle", "top")],
                       [("red", "circle", "top"), ("blue", "star", "left")])


class _Tok:
    """Stands in for a DocumentTokenizer: caption -> ids, picture -> codes of its red level."""
    class text:
        @staticmethod
        def encode(s):
            return [30 + int(s[-1]), 60]

    @staticmethod
    def image_codes(images):
        return [tuple([int(im) % 32] * 16) for im in images]


def test_score_is_a_scorer_and_save_load_keeps_it(tmp_path, encoder):
    enc = encoder.attach(_Tok())
    s = enc.score("concept 3", [1, 2, 3])
    assert s.shape == (3,) and float(s.abs().max()) <= 1.0 + 1e-5
    assert float(enc.score("concept 3", 2)) == pytest.approx(float(s[1]), abs=1e-6)
    enc.save(tmp_path / "enc.safetensors")
    again = DualEncoder.load(tmp_path / "enc.safetensors", tokenizer=_Tok())
    assert torch.allclose(again.score("concept 3", [1, 2, 3]), s, atol=1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        DualEncoder.load(tmp_path / "enc.safetensors").score("x", [1])
