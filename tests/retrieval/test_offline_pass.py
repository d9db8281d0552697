"""The offline pass end to end on a small corpus: rules hold on every row, shards, determinism."""
import numpy as np
import pytest

from engine.retrieval.memory_bank import MemoryBank
from engine.retrieval.offline import load_neighbours, query_embeddings, retrieval_pass, retrieve_shard, shard_range
from engine.retrieval.selection import MISSING, caption_keys, image_keys
from retrieval_fixtures import small_cfg


@pytest.fixture(scope="module")
def bank(corpus, encoder):
    data, _ = corpus
    return MemoryBank.build(encoder.encode_documents(data.captions, data.codes).numpy(), kind="flat")


def run_pass(tmp_path, corpus, encoder, bank, seed=0, threshold=0.9, shards=3, name="a"):
    data, _ = corpus
    r = small_cfg(shards=shards, dedup_threshold=threshold)
    retrieval_pass(tmp_path / name, encoder, bank, data.captions, data.codes, caption_keys(data.captions),
                   image_keys(data.codes), r.k, r.dedup_threshold, r.query_dropout, r.candidates,
                   r.shards, seed, progress=False)
    return load_neighbours(tmp_path / name, len(data))


def test_rules_hold_on_every_row(tmp_path, corpus, encoder, bank):
    data, _ = corpus
    rows = run_pass(tmp_path, corpus, encoder, bank)
    assert sorted(p.name for p in (tmp_path / "a").glob("neighbours_*.npy")) == \
        [f"neighbours_{s:05d}-of-00003.npy" for s in range(3)]
    caps, imgs = caption_keys(data.captions), image_keys(data.codes)
    # Recompute each shard's (dropped) queries with the pass's RNG to check the threshold.
    for shard in range(3):
        lo, hi = shard_range(shard, 3, len(data))
        q = query_embeddings(encoder, data.captions[lo:hi], data.codes[lo:hi], 0.2,
                             np.random.default_rng([0, shard]))
        docs = encoder.encode_documents(data.captions, data.codes).numpy()
        for i in range(lo, hi):
            got = [j for j in rows[i] if j != MISSING]
            assert i not in got
            assert len(set(got)) == len(got)
            for j in got:
                assert caps[j] != caps[i] and imgs[j] != imgs[i]
                assert float(q[i - lo] @ docs[j]) <= 0.9 + 1e-4
            assert len({caps[j] for j in got}) == len(got) and len({imgs[j] for j in got}) == len(got)
    # the planted duplicates are never each other's neighbours
    assert 1 not in rows[0] and 0 not in rows[1] and 3 not in rows[2] and 2 not in rows[3]


def test_k_documents_when_the_bank_has_them(tmp_path, corpus, encoder, bank):
    rows = run_pass(tmp_path, corpus, encoder, bank, threshold=1.01)
    assert (rows != MISSING).all()
    assert rows.shape == (len(corpus[0]), 2)


def test_threshold_can_leave_rows_short_but_never_breaks_them(corpus, encoder, bank):
    data, _ = corpus
    rows, scores = retrieve_shard(0, 1, encoder, bank, data.captions, data.codes,
                                  caption_keys(data.captions), image_keys(data.codes), 2, -1.0,
                                  0.2, 8, seed=0)
    assert (rows == MISSING).all() and np.isnan(scores).all()


def test_deterministic_for_a_seed_and_independent_of_sharding(tmp_path, corpus, encoder, bank):
    a = run_pass(tmp_path, corpus, encoder, bank, seed=5, name="a")
    b = run_pass(tmp_path, corpus, encoder, bank, seed=5, name="b")
    c = run_pass(tmp_path, corpus, encoder, bank, seed=6, name="c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)        # the query dropout depends on the seed


def test_neighbours_are_related(tmp_path, corpus, encoder, bank):
    """Retrieval quality on the synthetic concepts: most neighbours share the query's concept."""
    data, concept = corpus
    rows = run_pass(tmp_path, corpus, encoder, bank, threshold=1.01)
    same = [concept[j] == concept[i] for i in range(len(data)) for j in rows[i] if j != MISSING]
    assert np.mean(same) > 0.8


def test_manifest_mismatch_is_a_clear_error(tmp_path, corpus, encoder, bank):
    run_pass(tmp_path, corpus, encoder, bank)
    with pytest.raises(ValueError, match="delete"):
        load_neighbours(tmp_path / "a", 7)
    with pytest.raises(FileNotFoundError, match="never finished"):
        load_neighbours(tmp_path / "missing", 7)
