"""The FAISS memory bank: exact search equals brute force, approximate kinds report recall,
files round-trip without pickle."""
import numpy as np
import pytest

from engine.retrieval.memory_bank import MemoryBank, choose_kind


def unit(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_equals_brute_force_and_maps_ids():
    v, q = unit(500), unit(20, seed=1)
    ids = np.arange(1000, 1500)
    bank = MemoryBank.build(v, ids, kind="flat")
    scores, got = bank.search(q, 5)
    want = np.argsort(-(q @ v.T), axis=1)[:, :5] + 1000
    assert np.array_equal(got, want)
    assert np.allclose(scores, np.sort(q @ v.T, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_k_larger_than_bank_is_clamped():
    bank = MemoryBank.build(unit(3), kind="flat")
    scores, got = bank.search(unit(1, seed=2), 10)
    assert got.shape == (1, 3) and sorted(got[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_measure_recall(kind):
    bank = MemoryBank.build(unit(4000), kind=kind, recall_queries=200)
    assert bank.kind == kind
    assert 0.8 <= bank.info["recall@2"] <= 1.0


def test_auto_picks_exact_below_the_limit():
    assert choose_kind("auto", 10, 100) == "flat"
    assert choose_kind("auto", 1000, 100) == "ivf"
    with pytest.raises(ValueError, match="choose one of"):
        choose_kind("annoy", 10, 100)


def test_save_load_round_trip(tmp_path):
    v = unit(300)
    bank = MemoryBank.build(v, np.arange(300) * 7, kind="flat")
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.faiss", "bank.json", "bank_ids.npy"]
    again = MemoryBank.load(tmp_path / "bank")
    q = unit(4, seed=3)
    assert np.array_equal(bank.search(q, 3)[1], again.search(q, 3)[1])
    with pytest.raises(FileNotFoundError, match="never finished"):
        MemoryBank.load(tmp_path / "other")


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="dimension"):
        MemoryBank.build(unit(10), kind="flat").search(unit(1, d=8), 1)
