"""The paged KV cache under the model: prefill + decode through PagedKVCache gives the
contiguous cache's logits and greedy tokens, through both of its faces (the plain
update() protocol and the paged attend() path); forks share blocks and copy on write.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import get_preset
from engine.inference.kv_cache import ContiguousKVCache
from engine.inference.paged_cache import KVPool
from engine.model import Transformer

VOCAB = 300


def tiny_model(n_kv_heads: int | None = None, seed: int = 0, max_seq_len: int = 128,
               position: str = "learned") -> Transformer:
    """The tiny preset shrunk to 2 layers of width 64; sharp logits so greedy has no near-ties."""
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=2, d_model=64, n_heads=4,
                              n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, tie_embeddings=False,
                              position=position)
    torch.manual_seed(seed)
    model = Transformer(cfg, VOCAB).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@torch.no_grad()
def greedy_alone(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """The oracle: one request, a contiguous cache, argmax each step."""
    c = model.cfg
    cache = ContiguousKVCache(c.n_layers, 1, c.kv_heads, c.head_dim, len(prompt) + new_tokens)
    ids, out = torch.tensor([prompt]), []
    for _ in range(new_tokens):
        token = int(model.logits(model(ids, cache=cache)[:, -1]).argmax(-1))
        out.append(token)
        ids = torch.tensor([[token]])
    return out


@torch.no_grad()
def greedy_paged(model: Transformer, prompts: list[list[int]], new_tokens: int, block_size: int,
                 plain_protocol: bool = False) -> list[list[int]]:
    """All prompts in one pool: each prefilled alone, then decoded together (mixed lengths)."""
    pool = KVPool.for_model(model, num_blocks=64, block_size=block_size)
    outs = []
    for seq, p in enumerate(prompts):
        pool.add(seq, p)
        view = pool.view([seq])
        outs.append([int(model.logits(model(torch.tensor([p]), cache=view)[:, -1]).argmax(-1))])
    for _ in range(new_tokens - 1):
        for seq, o in enumerate(outs):
            pool.append(seq, o[-1])
        view = pool.view(list(range(len(prompts))))
        if plain_protocol:   # hide attend(): the model falls back to update() + ops.attention
            view.attend = None
            del view.attend
        ids = torch.tensor([[o[-1]] for o in outs])
        logits = model.logits(model(ids, positions=view.positions(), cache=view)[:, -1])
        for o, t in zip(outs, logits.argmax(-1).tolist()):
            o.append(t)
    return outs


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_greedy_paged_equals_contiguous(block_size, n_kv_heads, position):
    model = tiny_model(n_kv_heads, position=position)
    g = torch.Generator().manual_seed(block_size)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 17, 40)]
    got = greedy_paged(model, prompts, 12, block_size)
    assert got == [greedy_alone(model, p, 12) for p in prompts]


def test_plain_update_protocol_matches_for_equal_lengths():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    got = greedy_paged(model, prompts, 6, 8, plain_protocol=True)
    assert got == [greedy_alone(model, p, 6) for p in prompts]


@torch.no_grad()
def test_forked_samples_share_blocks_and_copy_on_write():
    model = tiny_model()
    pool = KVPool.for_model(model, num_blocks=16, block_size=8)
    prompt = list(range(1, 12))                     # one full block and 3 tokens
    pool.add(0, prompt)
    hidden = model(torch.tensor([prompt]), cache=pool.view([0]))
    pool.fork(0, 1)
    pool.manager.mark_computed(1, len(prompt))
    first, last = pool.manager.block_table(0)
    assert pool.manager.block_table(1) == [first, last] and pool.manager.refcount(last) == 2
    before = [k[last].clone() for k in pool.k]
    pool.append(0, 3)
    pool.append(1, 4)                               # both diverge inside the shared block
    assert pool.manager.block_table(0)[-1] != last or pool.manager.block_table(1)[-1] != last
    view = pool.view([0, 1])
    logits = model.logits(model(torch.tensor([[3], [4]]), positions=view.positions(), cache=view)[:, -1])
    for a, b in zip(before, pool.k):                # nobody wrote into the other's rows
        copy = pool.manager.block_table(1)[-1]
        assert torch.equal(a[:3], b[copy][:3])
    for row, tok in ((0, 3), (1, 4)):
        ref = model.logits(model(torch.tensor([prompt + [tok]]))[:, -1])
        torch.testing.assert_close(logits[row:row + 1], ref, atol=1e-3, rtol=1e-4)
    assert hidden.shape[1] == len(prompt)


def test_pool_reports_memory_and_rejects_overflow():
    model = tiny_model()
    pool = KVPool.for_model(model, num_blocks=2, block_size=8)
    assert pool.bytes_in_use() == 0
    pool.add(0, list(range(10)))
    assert pool.bytes_in_use() == pool.bytes
    from engine.inference.paged_cache import OutOfBlocks
    with pytest.raises(OutOfBlocks):
        pool.add(1, [1, 2])
