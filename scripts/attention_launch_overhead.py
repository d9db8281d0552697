"""How much of the Triton forward's benchmark time is the GPU, and how much the Python that
launches it (GPU only).

  python scripts/attention_launch_overhead.py [--seq 4096] [--head-dim 128] [--full] [--profile]

Session 5's tile sweep timed the d=128 causal 4k forward at 0.61-0.62 ms, while
bench/run.py measured the same kernel at 0.64-0.67 ms in the same call. triton's do_bench
times each call between two CUDA events after an L2 flush; if the Python between the flush
and the kernel (the wrapper, the custom op, Triton's launcher) outlasts the flush, the GPU
waits inside the timed window. This times the forward four ways at the benchmark's shape:
  wrapper     flash_attention(q, k, v) under no_grad, as bench/attention.py does;
  op          the custom op engine::flash_attention directly, as the tile sweep does;
  graph       a CUDA graph of the op replayed: GPU time with no Python in the window;
  cpu launch  Python time per call of the wrapper at a shape the GPU finishes at once, for
              the table's loop variant and for the pointer loop: the TMA variant takes host-made
              tensor descriptors, and launching it cost 256 us against 90 on an H100 (session
              14's runs 4 and 3, one variant each). --profile adds where that time goes
              (cProfile, the busiest functions).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import flash_attention as fa  # noqa: E402


def cpu_launch_us(q, k, v, causal: bool, calls: int = 300) -> float:
    """Python time per call: at a shape the GPU finishes at once, the loop is CPU-bound."""
    with torch.no_grad():
        for _ in range(20):
            fa.flash_attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fa.flash_attention(q, k, v, causal=causal)
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def launch_profile(q, k, v, causal: bool, calls: int = 300, top: int = 14) -> str:
    """cProfile's busiest functions (by own time) over `calls` launches of the wrapper."""
    with torch.no_grad():
        for _ in range(20):
            fa.flash_attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fa.flash_attention(q, k, v, causal=causal)
        prof.disable()
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--full", action="store_true", help="no causal mask")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the Python of the table variant's launch")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton.testing

    s, d, causal = args.seq, args.head_dim, not args.full
    b, h = 16384 // s, 2048 // d                 # bench/attention.py's shapes
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    scale = d ** -0.5
    flops = 4 * b * h * s * s * d / (2 if causal else 1)

    def wrapper():
        with torch.no_grad():
            return fa.flash_attention(q, k, v, causal=causal)

    def op():
        return fa.flash_attention_fwd(q, k, v, causal, scale)

    op()                                          # compile before capturing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):              # warm up off the default stream
        for _ in range(2):
            op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op()

    blk = fa.pick_blocks("fwd", d, causal, q.dtype)
    print(f"{torch.cuda.get_device_name()}  b={b} h={h} s={s} d={d} "
          f"{'causal' if causal else 'full'}  tiles {tuple(blk)} "
          f"-> {fa.fwd_variant(blk, q, k, v)}")
    for name, fn in (("wrapper", wrapper), ("op", op), ("graph", graph.replay)):
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        print(f"  {name:<8} {ms:.4f} ms  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s")
    small = [x[:1, :1, :128].contiguous() for x in (q, k, v)]
    key = ("fwd", 64 if d <= 64 else 128, causal)
    table = fa._HOPPER[key]
    try:
        for variant in dict.fromkeys([table.variant, "ptr"]):
            fa._HOPPER[key] = table._replace(variant=variant)
            us = cpu_launch_us(*small, causal)
            print(f"  cpu launch {us:.1f} us per flash_attention() call ({variant})")
    finally:
        fa._HOPPER[key] = table
    if args.profile:
        print(launch_profile(*small, causal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
