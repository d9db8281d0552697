"""The selection rules on hand-made candidate lists."""
import numpy as np

from engine.retrieval.selection import MISSING, as_row, caption_keys, content_key, image_keys, select_neighbours
import torch

# doc:          0   1   2   3   4   5   6
CAPS = caption_keys([[1], [2], [3], [1], [4], [5], [6]])      # doc 3 has doc 0's caption
IMGS = image_keys(torch.tensor([[0], [1], [2], [3], [0], [5], [5]]))   # 4 = 0's image, 6 = 5's


def pick(ids, scores, k=2, threshold=0.9, query=0):
    return select_neighbours(np.array(ids), np.array(scores, dtype=np.float32), k, threshold,
                             CAPS, IMGS, query=query)


def test_skips_self_near_duplicates_and_exact_duplicates():
    # self (0), above threshold (1), same caption (3), same image (4) all skipped
    assert pick([0, 1, 3, 4, 2, 5], [1.0, 0.95, 0.8, 0.8, 0.7, 0.6]) == [2, 5]


def test_threshold_is_strictly_above():
    assert pick([2, 5], [0.9, 0.89]) == [2, 5]
    assert pick([2, 5], [0.9000001, 0.89]) == [5]


def test_no_two_chosen_documents_are_duplicates_of_each_other():
    assert pick([5, 6, 2], [0.8, 0.79, 0.5]) == [5, 2]


def test_best_first_regardless_of_input_order_and_missing_ids():
    assert pick([MISSING, 2, 5, 1], [np.inf, 0.3, 0.6, 0.5]) == [5, 1]


def test_k_when_available_and_fewer_when_not():
    assert len(pick([1, 2, 5, 6], [0.5, 0.4, 0.3, 0.2], k=3)) == 3
    assert pick([0, 4, 3], [1.0, 0.5, 0.5], k=2) == []
    assert as_row([5], 3).tolist() == [5, MISSING, MISSING]


def test_outside_query_uses_given_keys():
    got = select_neighbours(np.array([0, 3, 2]), np.array([0.8, 0.7, 0.6]), 2, 0.9, CAPS, IMGS,
                            query_caption_key=content_key([1]))
    assert got == [2]


def test_content_key_is_stable():
    assert content_key([1, 2, 3]) == content_key(np.array([1, 2, 3], dtype=np.int32))
    assert content_key([1, 2, 3]) != content_key([3, 2, 1])
    assert 0 <= content_key([7]) < 2 ** 63
