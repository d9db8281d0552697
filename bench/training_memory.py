"""One training step (forward + backward of the model and its span loss) with and without
activation checkpointing: peak memory and time, the plain step being the reference.

Packed rows of uneven documents, half the positions carrying a target. CPU: 8 blocks of
d=256 (the tiny preset's width) over 4 x 1,024 tokens in fp32 (quick: 2 x 512). CUDA: 16
blocks of d=1,024 (cm3leon-350m's width) over 4 x 4,096 tokens, bf16 autocast over fp32
weights, as engine.trainer runs. `x ref` is the plain step's time over the row's; the extras
give peak memory relative to the plain step. Peak memory is the step's own, above what was
in use before it (the model, its gradients from the warm-up): CUDA's allocator peak; on CPU
the resident high-water mark, each variant in a process of its own (see cpu_peak_mb).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import (Row, device_name, packed_rows, peak_memory_mb, time_fn,
                          training_step)
from engine.config import get_preset
from engine.model import Transformer

VOCAB = 1_536


def _shape(cuda: bool, quick: bool):
    if cuda:
        return 16, 1024, 16, 4, 4096
    return (8, 256, 4, 2, 512) if quick else (8, 256, 4, 4, 1024)


def _step_fn(cuda: bool, quick: bool, checkpointing: bool):
    device = torch.device("cuda" if cuda else "cpu")
    layers, d, heads, batch, seq = _shape(cuda, quick)
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=layers, d_model=d,
                              n_heads=heads, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).to(device).train()
    model.activation_checkpointing = checkpointing
    return training_step(model, packed_rows(batch, seq, 3, VOCAB, device), bf16=cuda)


def cpu_peak_mb(quick: bool, checkpointing: bool) -> float:
    """Run in a fresh process whose allocator hands every buffer over 64 KiB back to the
    kernel when freed (MALLOC_MMAP_THRESHOLD_), so the resident-set high-water mark of the
    measured step counts its own allocations, not heap left over from the warm-up."""
    step = _step_fn(False, quick, checkpointing)
    step()
    return peak_memory_mb(step, "cpu")


def _cpu_peak_in_subprocess(quick: bool, checkpointing: bool) -> float:
    code = ("from bench.training_memory import cpu_peak_mb; "
            f"print(cpu_peak_mb({quick}, {checkpointing}))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[Row]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    layers, d, heads, batch, seq = _shape(cuda, quick)
    results = {}
    for name, on in (("plain", False), ("activation_checkpointing", True)):
        step = _step_fn(cuda, quick, on)
        step()  # warm-up: kernels compiled, gradient buffers sized
        if cuda:
            mem, ms = peak_memory_mb(step, device), time_fn(step, device)
        else:
            mem = _cpu_peak_in_subprocess(quick, on)
            ms = time_fn(step, warmup=1, reps=3, min_time_s=0.0)
        results[name] = (ms, mem)
        del step
    plain_ms, plain_mem = results["plain"]
    case = (f"{layers} blocks d={d}, {batch}x{seq} tokens, "
            f"{'bf16 autocast' if cuda else 'fp32'}")
    return [Row("training_memory", case, name, ms, plain_ms / ms, mem,
                {"mem_vs_plain": mem / max(plain_mem, 1e-9)}, device_name(device))
            for name, (ms, mem) in results.items()]
