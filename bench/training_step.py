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

from bench.common import Row, device_name, packed_rows, time_fn, training_step
from engine.config import get_preset
from engine.model import Transformer
from engine.trainer import bf16_autocast_ok

VOCAB = 1_536


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
    bf16 = bf16_autocast_ok(device)
    step = training_step(model, packed_rows(batch, seq, docs, VOCAB, device), bf16)

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
