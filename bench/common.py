"""Timing and memory helpers shared by the benchmark modules.

Each module under bench/ exposes `run(quick: bool) -> list[Row]`; bench/run.py collects the
rows into one table. A Row's `ratio` is the reference's time divided by this row's time,
measured in the same run (> 1 means faster than the reference).
"""
from __future__ import annotations

import gc
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    bench: str            # module name, e.g. "sampling"
    case: str             # shape / setting, e.g. "B=64 V=64512"
    impl: str             # "reference", "cpp", "triton", "cuda", or a peer's name
    time_ms: float
    ratio: float | None = None            # reference time / this time, same run
    peak_mem_mb: float | None = None
    extra: dict = field(default_factory=dict)   # TFLOP/s, GB/s, % of peak, ...
    device: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 2,
            reps: int = 10, min_time_s: float = 0.2, cuda_ms: int = 100) -> float:
    """Median milliseconds per call. On CUDA it uses triton.testing.do_bench (cold L2) for
    about `cuda_ms` of calls; warmup, reps and min_time_s are the CPU loop's."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=cuda_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time_s and len(times) < 1000:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak memory of one call above what was in use before it (MiB).

    CUDA: the caching allocator's peak. CPU: torch has no CPU peak counter, so this resets
    the kernel's resident-set high-water mark (/proc/self/clear_refs) and reads VmHWM after
    the call. glibc serves buffers above its mmap threshold (at most 32 MiB) with mmap and
    unmaps them when freed, so large transients are counted exactly; smaller ones reused from
    the heap may be under-counted. (Pinning the threshold low would make the count exact but
    slow every allocation, which would bias the timings against allocation-heavy references.)
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_mb("VmRSS:")
    fn()
    return max(_proc_status_mb("VmHWM:") - base, 0.0)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def packed_rows(batch: int, seq: int, docs: int, vocab: int, device) -> tuple:
    """(ids, positions, cu_seqlens, targets) of `batch` packed rows of `seq` tokens, each
    `docs` documents of uneven length, half the positions carrying a target: a training
    batch as engine.data.packing makes one, for the training benchmarks."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[torch.rand(batch, seq, generator=g) < 0.5] = -100
    cuts = [round(i * seq / docs) + (7 if 0 < i < docs else 0) for i in range(docs + 1)]
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:])])[None]
    cu = torch.tensor([r * seq + c for r in range(batch) for c in cuts[:-1]] + [batch * seq],
                      dtype=torch.int32)
    return (ids.to(device), positions.expand(batch, -1).to(device), cu.to(device),
            targets.to(device))


def training_step(model, rows: tuple, bf16: bool) -> Callable[[], None]:
    """One forward and backward of `model` and its span loss on `rows` (packed_rows), as
    engine.trainer runs it; the gradients are dropped so that every call allocates them."""
    ids, positions, cu, targets = rows
    device_type = ids.device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(model(ids, positions=positions, cu_seqlens=cu), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step
