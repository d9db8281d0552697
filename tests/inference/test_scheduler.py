"""Continuous batching under load: many requests through a pool too small for all of them
at once finish, none lost, each token for token what it gives alone (greedy); plus the
bounded queue, forks for n samples and prefix reuse across requests.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.inference.paged_cache import KVPool
from engine.inference.scheduler import QueueFull, Request, Scheduler
from tests.inference.test_paged_cache import VOCAB, greedy_alone, tiny_model


def test_200_requests_through_a_small_pool():
    model = tiny_model(n_kv_heads=2)
    rng = random.Random(0)
    pool = KVPool.for_model(model, num_blocks=24, block_size=8)      # 192 token slots
    sched = Scheduler(model, pool, max_running=16, max_queue=200)
    reqs = [sched.submit(Request([rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))],
                                 max_new_tokens=rng.randint(1, 16))) for _ in range(200)]
    total_need = sum(-(-(len(r.prompt) + r.max_new_tokens) // 8) for r in reqs)
    assert total_need > 10 * pool.num_blocks                          # cannot all fit at once
    done = sched.run()
    assert sorted(r.id for r in done) == sorted(r.id for r in reqs)   # none lost, none twice
    assert sched.preemptions > 0                                      # the pool ran out mid-decode
    assert pool.manager.num_free_blocks() == pool.num_blocks and not pool.manager.sequences()
    for r in reqs:
        assert r.outputs[0] == greedy_alone(model, r.prompt, r.max_new_tokens), r.id


def test_requests_join_between_steps_and_n_samples_share_the_prompt():
    model = tiny_model()
    pool = KVPool.for_model(model, num_blocks=40, block_size=8)
    sched = Scheduler(model, pool)
    a = sched.submit(Request(list(range(1, 20)), max_new_tokens=10, n=4))
    sched.step()
    tables = [pool.manager.block_table(s) for s in sched.seqs[a.id]]
    assert all(t[:2] == tables[0][:2] for t in tables)                # full prompt blocks shared
    assert pool.manager.refcount(tables[0][0]) == 4
    for _ in range(3):
        sched.step()
    b = sched.submit(Request([7, 8, 9], max_new_tokens=5))           # joins a running batch
    done = sched.run()
    assert {r.id for r in done} == {a.id, b.id}
    want = greedy_alone(model, a.prompt, 10)
    assert a.outputs == [want] * 4 and b.outputs[0] == greedy_alone(model, b.prompt, 5)


def test_identical_prefix_is_reused_across_requests():
    model = tiny_model()
    pool = KVPool.for_model(model, num_blocks=20, block_size=8)
    sched = Scheduler(model, pool)
    prompt = list(range(30, 60))
    first = sched.submit(Request(prompt, max_new_tokens=3))
    sched.run()
    assert pool.add(99, prompt + [1]) == 24                           # three cached blocks found
    pool.free(99)
    second = sched.submit(Request(prompt, max_new_tokens=3))
    sched.run()
    assert second.outputs == first.outputs == [greedy_alone(model, prompt, 3)]


def test_queue_bound_and_request_errors():
    model = tiny_model()
    sched = Scheduler(model, KVPool.for_model(model, num_blocks=4, block_size=8), max_queue=2)
    sched.submit(Request([1], 1))
    sched.submit(Request([2], 1))
    with pytest.raises(QueueFull, match="queue is full \\(2 waiting"):
        sched.submit(Request([3], 1))
    other = Scheduler(model, KVPool.for_model(model, num_blocks=4, block_size=8))
    with pytest.raises(ValueError, match="pool has 4"):
        other.submit(Request([1] * 40, 8))
    with pytest.raises(ValueError, match="context length"):
        other.submit(Request([1] * 120, 20))
    assert len(sched.run()) == 2 and torch.get_num_threads() >= 1
