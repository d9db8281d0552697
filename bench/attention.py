"""Attention: the Triton flash kernel against the masked-SDPA reference and torch's SDPA kernels.

FLOPs (flash-attention's convention): forward 4 * b * h * s^2 * d, halved when causal;
backward 2.5x the forward. Shapes keep b * s = 16k tokens and h * d = 2048, as the published
FA2/FA3 tables do, so sequence lengths compare at equal work per token.

On CUDA (bf16): seq 1k/4k/16k (quick: 1k), head dim 64/128, causal and not; impls are
`triton` (kernels/flash_attention.py), the engine `reference` (SDPA with an explicit boolean
mask, the ratio's base) and SDPA forced to each backend the device offers (flash, cudnn,
efficient; one that refuses the shape is skipped). TFLOP/s and % of the bf16 dense peak are
reported when the device's peak is known. Each impl is timed in two sweeps, the second in
reverse order, so that clock drift over the run favours no impl.

On CPU: the reference against plain SDPA (is_causal, no mask tensor) at small sizes. The
Triton rows are skipped, and the case names say so: the interpreter that runs them on CPU is
a test vehicle, orders of magnitude slower, not a speed path.

Also on CPU: the tiny preset's training shape (b=16 rows of s=256, h=4, d=64, bf16, three
packed documents of 70-85 tokens a row plus a padding tail, causal), `reference` against the
`cpp` backend (csrc/cpu/attention*.cpp), forward and forward+backward, on 2 threads as the
trainer runs (the device name gives the thread count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Row, device_name, peak_memory_mb, time_fn
from engine.ops.attention import attention, reference

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}   # dense bf16 tensor-core peak, by name


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def flops(b: int, h: int, s: int, d: int, causal: bool, backward: bool) -> float:
    f = 4 * b * h * s * s * d / (2 if causal else 1)
    return 2.5 * f if backward else f


def sdpa_impls(device: torch.device) -> dict:
    impls = {"reference": lambda q, k, v, causal: reference(q, k, v, causal=causal)}
    if device.type != "cuda":
        impls["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return impls
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def fn(q, k, v, causal):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        impls[name] = forced(backend)
    from kernels.flash_attention import flash_attention
    impls["triton"] = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    return impls


def triton_tiles(kind: str, d: int, causal: bool, q, k, v) -> str:
    """The tiles (and, for the forward, the load variant) the Triton row ran with."""
    from kernels import flash_attention as fa
    kinds = ("fwd",) if kind == "fwd" else ("dkdv", "dq")
    parts = []
    for pass_ in kinds:
        blk = fa.pick_blocks(pass_, d, causal, q.dtype)
        tag = f"{blk.block_m}x{blk.block_n}w{blk.num_warps}s{blk.num_stages}"
        if pass_ == "fwd":
            tag += f":{fa.fwd_variant(blk, q, k, v)}"
        parts.append(tag)
    return "/".join(parts)


def bench_case(b, h, s, d, causal, device, dtype, note="") -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen)
    peak = peak_tflops(device)
    dev = device_name(device)
    impls = {}
    for name, fn in sdpa_impls(device).items():
        try:
            with torch.no_grad():
                fn(q, k, v, causal)       # a backend that refuses the shape raises here
            impls[name] = fn
        except RuntimeError as exc:
            print(f"  skip {name} at s={s} d={d}: {str(exc).splitlines()[0][:100]}")
    # On a GPU every impl is timed twice, the second time in reverse order, for half as long
    # each time, and gets the mean of its two medians: the clock drifts as the GPU heats under
    # the heavy rows, and a fixed order would hand that drift to whichever impl runs last.
    if device.type == "cuda":
        sweeps, reps = (list(impls), list(impls)[::-1]), dict(cuda_ms=50)
    else:
        sweeps, reps = (list(impls),), dict(reps=5, min_time_s=0.1)
    times: dict[tuple[str, str], list[float]] = {}
    mems: dict[tuple[str, str], float] = {}
    for sweep in sweeps:
        for name in sweep:
            fn = impls[name]
            out = fn(q, k, v, causal)

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v, causal)

            def bwd(out=out):
                return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

            for kind, call in (("fwd", fwd), ("bwd", bwd)):
                times.setdefault((name, kind), []).append(time_fn(call, device, **reps))
                if (name, kind) not in mems:
                    mems[(name, kind)] = peak_memory_mb(call, device)
            del out, bwd, call   # the autograd graph of this impl goes before the next
    timed = {key: (sum(ms) / len(ms), mems[key]) for key, ms in times.items()}
    rows = []
    for (name, kind), (ms, mem) in timed.items():
        base = timed.get(("reference", kind))
        tflops = flops(b, h, s, d, causal, kind == "bwd") / (ms * 1e-3) / 1e12
        extra = {"TFLOP/s": tflops}
        if peak is not None:
            extra["% peak"] = 100 * tflops / peak
        if name == "triton":
            extra["tiles"] = triton_tiles(kind, d, causal, q, k, v)
        mask = "causal" if causal else "full"
        rows.append(Row("attention", f"{kind} b={b} h={h} s={s} d={d} {mask}{note}", name, ms,
                        ratio=None if base is None else base[0] / ms, peak_mem_mb=mem,
                        extra=extra, device=dev))
    return rows


def run(quick: bool) -> list[Row]:
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        seqs = (1024,) if quick else (1024, 4096, 16384)
        cases = [(16384 // s, 2048 // d, s, d, causal)
                 for s in seqs for d in (64, 128) for causal in (True, False)]
        note = ""
    else:
        device, dtype = torch.device("cpu"), torch.float32
        sizes = (256,) if quick else (256, 1024)
        cases = [(1, 4, s, 64, causal) for s in sizes for causal in (True, False)]
        note = " [cpu: triton rows skipped, the interpreter is not a speed path]"
    # CPU cases run on one thread: on the shared 2-core dev machines, OpenMP's barriers across
    # 2 threads wait out scheduler ticks and the times come out as multiples of ~8 ms.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rows = [row for b, h, s, d, causal in cases
                for row in bench_case(b, h, s, d, causal, device, dtype, note)]
    finally:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        for n in (2,) if quick else (1, 2):
            rows += training_case(n, quick)
    return rows


def packed_rows(b: int, s: int, lo: int = 70, hi: int = 85, per_row: int = 3,
                seed: int = 0) -> torch.Tensor:
    """cu_seqlens for rows of `per_row` documents of lo..hi tokens and a padding tail."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(b):
        row = torch.randint(lo, hi + 1, (per_row,), generator=gen).tolist()
        lengths += row + ([s - sum(row)] if sum(row) < s else [])
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def training_case(threads: int, quick: bool) -> list[Row]:
    b, h, s, d = 16, 4, 256, 64
    impls = [n for n in ("reference", "cpp") if n in attention.backends]
    if "cpp" not in impls:
        print("  skip cpp training rows: engine._C has no attention op")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        cu = packed_rows(b, s)
        q, k, v = (torch.randn(b, h, s, d, generator=gen).bfloat16().requires_grad_()
                   for _ in range(3))
        grad_out = torch.randn(b, h, s, d, generator=gen).bfloat16()
        dev = device_name("cpu")
        reps = dict(reps=5 if quick else 20, min_time_s=0.2 if quick else 1.0)
        timed = {}
        for name in impls:
            def fwd(name=name):
                with torch.no_grad():
                    return attention(q, k, v, causal=True, cu_seqlens=cu, backend=name)

            def fwd_bwd(name=name):
                out = attention(q, k, v, causal=True, cu_seqlens=cu, backend=name)
                return torch.autograd.grad(out, (q, k, v), grad_out)

            timed[(name, "fwd")] = time_fn(fwd, "cpu", **reps)
            timed[(name, "fwd+bwd")] = time_fn(fwd_bwd, "cpu", **reps)
    finally:
        torch.set_num_threads(saved)
    case = f"b={b} h={h} s={s} d={d} causal bf16 docs 70-85 x3/row (tiny train)"
    return [Row("attention", f"{kind} {case}", name, ms, ratio=timed[("reference", kind)] / ms,
                device=dev) for (name, kind), ms in timed.items()]
