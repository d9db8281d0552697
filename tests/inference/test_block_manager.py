"""The C++ block manager against its Python model (engine/inference/block_model.py).

A hypothesis state machine drives both with the same random calls (new prompts that often
repeat a live or freed prefix, appends, forks, frees, computed marks) and after every step
checks that they agree exactly, and that the model's own invariants hold: every refcount
equals the number of tables holding the block, the free queue holds exactly the blocks
nobody holds (no leak, no double free), and a simulated KV pool (each slot holds the
token written there) shows every sequence exactly its own tokens, so neither
copy-on-write nor a prefix-cache hit ever changes or misreads another sequence's view.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import _native
from engine.inference.block_model import BlockModel
from tests.conftest import needs_native

NUM_BLOCKS = 12


def native_manager(num_blocks: int, block_size: int):
    return torch.classes.engine.BlockManager(num_blocks, block_size)


class _Machine(RuleBasedStateMachine):
    block_size = 8

    def __init__(self):
        super().__init__()
        self.model = BlockModel(NUM_BLOCKS, self.block_size)
        self.native = native_manager(NUM_BLOCKS, self.block_size) if _native.AVAILABLE else None
        self.pool = [[None] * self.block_size for _ in range(NUM_BLOCKS)]
        self.history: list[list[int]] = []   # every prompt seen, to draw shared prefixes from
        self.next_id = 0

    def both(self, name, *args):
        got = getattr(self.model, name)(*args)
        if self.native is not None:
            assert getattr(self.native, name)(*args) == got, name
        return got

    def write(self, seq: int, start: int) -> None:
        toks, table = self.model.tokens[seq], self.model.tables[seq]
        for pos in range(start, len(toks)):
            b, off = divmod(pos, self.block_size)
            self.pool[table[b]][off] = toks[pos]

    @rule(data=st.data(), length=st.integers(1, 40), reuse=st.booleans())
    def add(self, data, length, reuse):
        tokens = data.draw(st.lists(st.integers(0, 2), min_size=length, max_size=length))
        if reuse and self.history:
            base = data.draw(st.sampled_from(self.history))
            tokens = base[:data.draw(st.integers(1, len(base)))] + tokens[:data.draw(st.integers(0, 9))]
        seq, self.next_id = self.next_id, self.next_id + 1
        cached = self.both("add_sequence", seq, tokens)
        if cached >= 0:
            assert cached % self.block_size == 0 and cached < len(tokens)
            self.history.append(tokens)
            self.write(seq, cached)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(sorted(self.model.tables)))
        slot, src, dst = self.both("append_token", seq, token)
        if slot < 0:
            return
        if src >= 0:
            off = slot % self.block_size
            self.pool[dst][:off] = self.pool[src][:off]
        self.pool[slot // self.block_size][slot % self.block_size] = token

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.model.tables)))
        child, self.next_id = self.next_id, self.next_id + 1
        self.both("fork", parent, child)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def free(self, data):
        self.both("free", data.draw(st.sampled_from(sorted(self.model.tables))))

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def mark_computed(self, data):
        seq = data.draw(st.sampled_from(sorted(self.model.tables)))
        n = data.draw(st.integers(self.model.computed[seq], len(self.model.tokens[seq])))
        self.both("mark_computed", seq, n)

    @invariant()
    def agree(self):
        m = self.model
        assert self.both("sequences") == sorted(m.tables)
        assert self.both("num_free_blocks") == len(m.free_queue)
        for seq in m.tables:
            self.both("block_table", seq)
            self.both("num_tokens", seq)
            self.both("num_computed", seq)
        for b in range(NUM_BLOCKS):
            self.both("refcount", b)
            self.both("is_cached", b)

    @invariant()
    def refcounts_exact_and_nothing_leaks(self):
        m = self.model
        held = [0] * NUM_BLOCKS
        for table in m.tables.values():
            for b in table:
                held[b] += 1
        assert held == m.refs
        assert sorted(m.free_queue) == [b for b in range(NUM_BLOCKS) if held[b] == 0]

    @invariant()
    def every_view_is_its_own_tokens(self):
        for seq, toks in self.model.tokens.items():
            table = self.model.tables[seq]
            view = [self.pool[table[p // self.block_size]][p % self.block_size] for p in range(len(toks))]
            assert view == toks, f"sequence {seq} reads {view}, owns {toks}"


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_manager_matches_model(block_size):
    machine = type(f"Machine{block_size}", (_Machine,), {"block_size": block_size})
    machine.TestCase.settings = SETTINGS
    machine.TestCase("runTest").runTest()


@needs_native
def test_native_is_exercised():
    """The state machine compares against C++ only when it is built; make that visible."""
    bm = native_manager(4, 16)
    assert bm.add_sequence(0, list(range(40))) == 0 and bm.num_free_blocks() == 1


@needs_native
def test_prefix_hit_fork_and_copy_on_write():
    bm = native_manager(8, 8)
    prompt = list(range(20))                          # 2 full blocks + 4 tokens
    assert bm.add_sequence(0, prompt) == 0
    assert bm.add_sequence(1, prompt) == 0            # not computed yet: nothing to share
    bm.mark_computed(0, 20)
    assert bm.add_sequence(2, prompt) == 16           # both full blocks found
    assert bm.block_table(2)[:2] == bm.block_table(0)[:2]
    assert [bm.refcount(b) for b in bm.block_table(0)[:2]] == [2, 2]
    bm.fork(0, 3)
    last = bm.block_table(0)[-1]
    slot, src, dst = bm.append_token(3, 99)
    assert (src, slot) == (last, dst * 8 + 4) and bm.block_table(0)[-1] == last
    bm.free(0)
    bm.free(3)
    assert bm.is_cached(bm.block_table(2)[0])


@needs_native
def test_errors_are_clear():
    bm = native_manager(2, 16)
    with pytest.raises(ValueError, match="block_size must be 8, 16 or 32"):
        native_manager(2, 12)
    with pytest.raises(IndexError, match="no sequence 5"):
        bm.free(5)
    assert bm.add_sequence(0, [1] * 40) == -1 and bm.sequences() == []   # too big: no change
    bm.add_sequence(0, [1] * 30)
    with pytest.raises(ValueError, match="exists"):
        bm.fork(0, 0)
    assert bm.append_token(0, 1)[0] >= 0 and bm.append_token(0, 1)[0] >= 0
    assert bm.append_token(0, 1) == (-1, -1, -1)                        # pool exhausted
