"""Shared by the attention backend tests (Triton and C++): a forward + backward runner and a
packed two-row training batch with uneven documents."""
from __future__ import annotations

import torch

VOCAB = 300
DOCS = [[20, 1, 43], [64]]   # two packed rows of 64 tokens, one single-token document


def forward_backward(fn, q, k, v, grad_out, upcast=False, **kw):
    """(out, dq, dk, dv) of fn; with upcast, computed from fp32 copies (the oracle)."""
    if upcast:
        q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
        grad_out = grad_out.float()
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def packed_batch(device="cpu"):
    """ids, positions, cu_seqlens, targets for DOCS packed into rows."""
    g = torch.Generator().manual_seed(1)
    seq = sum(DOCS[0])
    ids = torch.randint(0, VOCAB, (len(DOCS), seq), generator=g)
    lengths = [n for row in DOCS for n in row]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(len(DOCS), seq)
    # Next-token targets inside each document; a document's last token has none.
    targets = torch.full_like(ids, -100)
    flat_ids, flat_t = ids.view(-1), targets.view(-1)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        flat_t[start:end - 1] = flat_ids[start + 1:end]
    return ids.to(device), positions.to(device), cu.to(device), targets.to(device)
