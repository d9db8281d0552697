"""Corpus encoding keeps its progress (engine/data/corpus.py): stopped mid-way, by Ctrl-C or
an error, it leaves numbered parts beside the corpus file, and the next call continues from
them to exactly the corpus an uninterrupted encoding makes."""
from __future__ import annotations

import pytest
import torch

from engine.data import corpus as corpus_mod
from engine.data.corpus import EncodedCorpus, encoded_corpus
from engine.data.shapes import ShapesDataset


class PixelCodes:
    """A stand-in VQ encoder that codes each image on its own, as the real one does."""
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(dim=1).flatten(1)[:, ::97] * 511).long()


class Words:
    def encode(self, caption: str) -> list[int]:
        return [len(w) for w in caption.split()]


class StopsOnce:
    """The dataset, except that reading item `at` raises `error` the first time."""
    def __init__(self, dataset, at: int, error: BaseException):
        self.dataset, self.at, self.error = dataset, at, error

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i == self.at and self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.dataset[i]


@pytest.fixture()
def dataset():
    return ShapesDataset(split="train", image_size=16, size=300, seed=3)


def _same(a: EncodedCorpus, b: EncodedCorpus) -> None:
    assert a.captions == b.captions
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_a_stopped_encoding_continues_to_the_same_corpus(dataset, tmp_path, error):
    whole = corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), batch=64, progress=False)
    path = tmp_path / "corpus.safetensors"
    stopping = StopsOnce(dataset, at=150, error=error)
    with pytest.raises(type(error)):
        encoded_corpus(path, stopping, Words(), PixelCodes(), progress=False)
    parts = tmp_path / "corpus.safetensors.parts"
    assert not path.exists() and [p.name for p in parts.iterdir()] == ["000000000000.safetensors"]
    assert len(EncodedCorpus.load(parts / "000000000000.safetensors")) == 128   # 2 whole batches
    _same(encoded_corpus(path, stopping, Words(), PixelCodes(), progress=False), whole)
    assert not parts.exists()
    _same(EncodedCorpus.load(path), whole)


def test_parts_are_written_as_it_goes(dataset, tmp_path, monkeypatch):
    """Every PART_EVERY_S: here after every batch, so a crash that skips the except clause
    (a killed process) still finds them."""
    monkeypatch.setattr(corpus_mod, "PART_EVERY_S", 0.0)
    parts = tmp_path / "parts"
    with pytest.raises(RuntimeError):
        corpus_mod.encode_corpus(StopsOnce(dataset, at=200, error=RuntimeError()), Words(),
                                 PixelCodes(), batch=50, progress=False, parts=parts)
    assert sorted(p.name for p in parts.iterdir()) == [f"{n:012d}.safetensors"
                                                       for n in (0, 50, 100, 150)]
    whole = corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), batch=50, progress=False)
    _same(corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), batch=64, progress=False,
                                   parts=parts), whole)


def test_foreign_parts_are_refused(dataset, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    item = EncodedCorpus([[1, 2]], torch.zeros(1, 3, dtype=torch.long))
    item.save(parts / "000000000005.safetensors")   # does not start at item 0
    with pytest.raises(ValueError, match="should start at item 0"):
        corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), parts=parts, progress=False)
    (parts / "000000000005.safetensors").unlink()
    EncodedCorpus([[1]] * 400, torch.zeros(400, 3, dtype=torch.long)).save(
        parts / "000000000000.safetensors")
    with pytest.raises(ValueError, match="another corpus"):
        corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), parts=parts, progress=False)


def test_a_stop_request_ends_the_batch_saves_it_and_says_so(dataset, tmp_path):
    """Ctrl-C / SIGTERM under StopRequests: the batch in hand finishes and is saved, then
    TrainingStopped names the stage and how many items are kept."""
    from engine.stop_request import TrainingStopped

    class StopAfterFirstBatch:
        def __init__(self):
            self.calls = 0

        @property
        def reason(self):
            self.calls += 1
            return "SIGTERM" if self.calls >= 2 else None

    path = tmp_path / "corpus.safetensors"
    with pytest.raises(TrainingStopped, match="corpus encoding item 256") as stopped:
        encoded_corpus(path, dataset, Words(), PixelCodes(), progress=False,
                       stop=StopAfterFirstBatch())
    assert stopped.value.exit_code == 143
    assert len(EncodedCorpus.load(tmp_path / "corpus.safetensors.parts" /
                                  "000000000000.safetensors")) == 256
    whole = corpus_mod.encode_corpus(dataset, Words(), PixelCodes(), progress=False)
    _same(encoded_corpus(path, dataset, Words(), PixelCodes(), progress=False), whole)
