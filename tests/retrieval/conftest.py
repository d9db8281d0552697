"""Fixtures for the retrieval tests (the synthetic data lives in retrieval_fixtures.py).

These models are tiny: with 2 threads on a loaded 2-core machine, OpenMP's spinning makes a
step ~100x slower than with one, so every retrieval test runs single-threaded.
"""
import contextlib

import pytest
import torch

from retrieval_fixtures import CODES, GRID, TEXT_SIZE, make_corpus, small_cfg


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def corpus():
    return make_corpus()


@pytest.fixture(scope="session")
def encoder(corpus):
    from engine.retrieval.encoder_training import train_dual_encoder
    data, _ = corpus
    with one_thread():
        return train_dual_encoder(data.captions, data.codes, TEXT_SIZE, CODES, GRID, small_cfg(),
                                  seed=0, progress=False)
