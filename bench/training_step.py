"""One training step (forward + backward of the model and its span loss) with the engine's
backends against the same step with every op's plain-PyTorch reference: tokens per second.

As engine.trainer runs it: bf16 autocast where the hardware has bf16 arithmetic, fp32
weights, packed rows of uneven documents (positions restart per document, cu_seqlens), half
the positions carrying a target. CPU: the tiny preset (4 blocks of d=256, 4 heads) over 8 x
256 tokens, 3 documents a row. CUDA: 8 blocks of cm3leon-350m's width (d=1,024, 16 heads)
over 4 x 4,096 tokens, 4 documents a row. `engine` is `auto` (CPU: the C++ attention and the
chunked loss; CUDA: the Triton flash attention and the chunked loss with its Triton row
pass); `reference` is ENGINE_BACKEND=reference (masked SDPA, full-logit loss). `x ref` is the
reference's time over the row's.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from bench.common import Row, device_name, time_fn
from engine.config import get_preset
from engine.model import Transformer
from engine.trainer import bf16_autocast_ok

VOCAB = 1_536


def _batch(batch, seq, docs, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    targets = torch.randint(0, VOCAB, (batch, seq), generator=g)
    targets[torch.rand(batch, seq, generator=g) < 0.5] = -100
    cuts = [round(i * seq / docs) + (7 if 0 < i < docs else 0) for i in range(docs + 1)]
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:])])[None]
    cu = torch.tensor([r * seq + c for r in range(batch) for c in cuts[:-1]] + [batch * seq],
                      dtype=torch.int32)
    return (ids.to(device), positions.expand(batch, -1).to(device), cu.to(device),
            targets.to(device))


def run(quick: bool) -> list[Row]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        layers, d, heads, batch, seq, docs = 8, 1024, 16, 4, 4096, 4
    else:
        layers, d, heads, batch, seq, docs = 4, 256, 4, 8, 256, 3
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=layers, d_model=d,
                              n_heads=heads, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).to(device).train()
    ids, positions, cu, targets = _batch(batch, seq, docs, device)
    bf16 = bf16_autocast_ok(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(model(ids, positions=positions, cu_seqlens=cu), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    saved = os.environ.get("ENGINE_BACKEND")
    timed = {}
    try:
        for name, backends in (("reference", "reference"), ("engine", "auto")):
            os.environ["ENGINE_BACKEND"] = backends
            step()  # warm-up: kernels compiled, buffers sized
            timed[name] = (time_fn(step, device) if cuda else
                           time_fn(step, warmup=1, reps=3 if quick else 10, min_time_s=0.0))
    finally:
        if saved is None:
            os.environ.pop("ENGINE_BACKEND", None)
        else:
            os.environ["ENGINE_BACKEND"] = saved
    case = (f"{layers} blocks d={d} h={heads}, {batch}x{seq} tokens, {docs} docs/row, "
            f"{'bf16 autocast' if bf16 else 'fp32'}")
    return [Row("training_step", case, name, ms, timed["reference"] / ms,
                extra={"tokens/s": batch * seq / (ms * 1e-3)}, device=device_name(device))
            for name, ms in timed.items()]
