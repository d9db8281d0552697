"""Measure the Triton flash-attention tiles on this GPU and write the fastest as a tile table.

  python scripts/tune_flash_attention.py --out blocks.json [--seq 4096] [--budget-s 150]
  ENGINE_FLASH_BLOCKS=blocks.json python bench/run.py --only attention

For each pass (forward, dK/dV, dQ), head-dim bucket (64, 128) and mask (causal, full) it
times a short list of candidate tiles at the benchmark's shape (b * s = 16k tokens,
h * d = 2048, bf16), one candidate at a time in the kernels' own tile table, and keeps the
fastest whose output matches the reference. Forward candidates also name a loop variant
(pointers or TMA, lazy rescaling; see Blocks.variant), so the table records the variant that
won. A tile the compiler rejects (too much shared memory, too many registers) is reported
and skipped. The backward kinds are timed as the
whole backward op, so a dK/dV tile is compared with the dQ tile held fixed (and vice versa).
The current table's entry is always among the candidates, so the result is never slower
than it as measured here. A time budget stops the sweep early; the table is rewritten after
every key, so what was measured is kept even if the process dies.

One pass over the candidates is not a fair race: on an H100 the same forward tile timed
0.58 ms as a sweep's first candidate and 0.62-0.66 ms minutes later in the same call (the SM
clock read 1,980 MHz between steps, so the cause is not known). So the sweep only shortlists:
the fastest few of each key (the current entry among them) are timed again in alternating
rounds, and the one with the best median over the rounds wins.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import flash_attention as fa  # noqa: E402
from kernels.flash_attention import Blocks  # noqa: E402

# Candidates per pass, (block_m, block_n, num_warps, num_stages[, forward variant]): around
# the table's reasoning (see kernels/flash_attention.py), plus the neighbours most often best
# on Hopper. The TMA and lazy variants come first, the pointer tiles after. At d=128 the
# 64x64 TMA tile with three stages takes 113 KiB of shared memory, exactly two programs per
# SM; 64x32 fits three. Pointer tiles that spilled registers in ptxas (64x128 with three
# stages, 128x64 on 4 warps) are left out. Every forward candidate compiles for sm_90 on
# Triton 3.6 and 3.9 without a GPU (tests/ops/test_flash_attention_compile.py checks the list).
CANDIDATES = {
    "fwd": [(64, 64, 4, 3, "tma"), (64, 64, 4, 4, "tma"), (64, 64, 4, 2, "tma"),
            (64, 32, 4, 3, "tma"), (64, 32, 4, 4, "tma"), (64, 128, 4, 2, "tma"),
            (128, 64, 8, 3, "tma"), (128, 128, 8, 2, "tma"), (128, 128, 8, 3, "tma"),
            (64, 64, 4, 3, "tma_lazy"), (64, 64, 4, 2, "tma_lazy"), (64, 32, 4, 3, "tma_lazy"),
            (128, 64, 8, 3, "tma_lazy"), (128, 128, 8, 2, "tma_lazy"),
            (64, 64, 4, 3, "ptr_lazy"), (64, 64, 4, 2, "ptr_lazy"), (128, 64, 8, 3, "ptr_lazy"),
            (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 4), (64, 128, 4, 2),
            (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
            (128, 32, 4, 4)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3),
             (64, 64, 8, 2), (32, 64, 4, 3), (32, 128, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
           (64, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
}


def inputs(seq: int, d: int):
    b, h = 16384 // seq, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                  for _ in range(4))
    return q, k, v, g


def tflops(seq: int, d: int, causal: bool, kind: str, ms: float) -> float:
    f = 4 * (16384 // seq) * (2048 // d) * seq * seq * d / (2 if causal else 1)
    return (f if kind == "fwd" else 2.5 * f) / (ms * 1e-3) / 1e12


def measure(kind, d, causal, seq, cand, ref):
    """(ms, max abs error against ref) of the pass with tile `cand`, or raises."""
    import triton.testing
    q, k, v, g = inputs(seq, d)
    scale = d ** -0.5
    fa._HOPPER[(kind, d, causal)] = cand
    if kind == "fwd":
        def fn():
            return fa.flash_attention_fwd(q, k, v, causal, scale)[0]
        got = fn()
    else:
        out, lse = fa.flash_attention_fwd(q, k, v, causal, scale)

        def fn():
            return fa.flash_attention_bwd(g, None, q, k, v, out, lse, causal, scale)
        got = torch.cat([x.flatten() for x in fn()])
    err = (got.float() - ref).abs().max().item()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return float(ms), err


def confirm(kind, d, causal, seq, shortlist, ref, rounds=3):
    """{candidate: median ms} over `rounds` alternating rounds (the order reversed every
    other round), so timings that drift during the call favour no candidate."""
    import statistics
    times = {cand: [] for cand in shortlist}
    for r in range(rounds):
        for cand in (shortlist if r % 2 == 0 else shortlist[::-1]):
            times[cand].append(measure(kind, d, causal, seq, cand, ref)[0])
    return {cand: statistics.median(ms) for cand, ms in times.items()}


def reference(kind, d, causal, seq):
    """fp32-accumulated SDPA on the same bf16 inputs (the flash backend)."""
    q, k, v, g = inputs(seq, d)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if kind == "fwd":
        return out.detach().float()
    grads = torch.autograd.grad(out, (q, k, v), g)
    return torch.cat([x.flatten() for x in grads]).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="tile table to write (JSON)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop the sweep after this")
    ap.add_argument("--log", type=Path, help="also write every measurement here (JSON)")
    ap.add_argument("--keys", default="", help="only these, e.g. fwd:128:causal,dq:64:full")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    start = time.time()
    # The forward first (the headline number), then the causal backward (the training path).
    keys = [("fwd", d, c) for d in (128, 64) for c in (True, False)]
    keys += [(kind, d, True) for d in (128, 64) for kind in ("dkdv", "dq")]
    keys += [(kind, d, False) for d in (128, 64) for kind in ("dkdv", "dq")]
    if args.keys:
        wanted = {(k, int(d), m == "causal") for k, d, m in
                  (item.split(":") for item in args.keys.split(","))}
        unknown = wanted - set(fa._HOPPER)
        if unknown:
            ap.error(f"unknown keys {sorted(unknown)}")
        keys = [key for key in keys if key in wanted]
    table, log = [], []

    def write():
        # After every key, so a sweep cut short (time limit, a crash) keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1) + "\n")
        if args.log:
            args.log.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                seq=args.seq, measurements=log), indent=1) + "\n")

    for kind, d, causal in keys:
        current = fa._HOPPER[(kind, d, causal)]
        cands = [current] + [c for c in (Blocks(*t) for t in CANDIDATES[kind]) if c != current]
        ref = reference(kind, d, causal, args.seq)
        # Two bf16 kernels differ by a few ulps of the largest value (2^-8 relative each);
        # a wrong tile (a mask or bound bug) is off by the values themselves.
        tol = 0.02 * max(ref.abs().max().item(), 1.0)
        best = None
        for cand in cands:
            if time.time() - start > args.budget_s:
                break
            try:
                ms, err = measure(kind, d, causal, args.seq, cand, ref)
            except Exception as exc:  # a tile the compiler or the launch rejects
                print(f"{kind} d={d} causal={causal} {tuple(cand)}: rejected "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:80]})", flush=True)
                continue
            ok = err <= tol
            tf = tflops(args.seq, d, causal, kind, ms)
            mark = "" if ok else f"  WRONG (err {err:.3g} > {tol:.3g})"
            print(f"{kind} d={d} causal={causal} {tuple(cand)}: {ms:.3f} ms"
                  f" {tf:.0f} TFLOP/s{mark}", flush=True)
            log.append(dict(kind=kind, head_dim=d, causal=causal, blocks=list(cand[:4]),
                            variant=cand.variant, ms=ms, err=err, ok=ok,
                            current=cand == current))
            if ok and (best is None or ms < best[1]):
                best = (cand, ms)
        if best is not None:
            ok_times = sorted((e["ms"], Blocks(*e["blocks"], e["variant"])) for e in log
                              if (e["kind"], e["head_dim"], e["causal"]) == (kind, d, causal)
                              and e["ok"])
            ranked = [c for _, c in ok_times]
            shortlist = list(dict.fromkeys(ranked[:3] + [c for c in ranked if c == current]))
            if len(shortlist) > 1 and time.time() - start <= args.budget_s + 30:
                medians = confirm(kind, d, causal, args.seq, shortlist, ref)
                for cand, ms in medians.items():
                    print(f"   rounds {kind} d={d} causal={causal} {tuple(cand)}: {ms:.3f} ms"
                          f" {tflops(args.seq, d, causal, kind, ms):.0f} TFLOP/s", flush=True)
                    log.append(dict(kind=kind, head_dim=d, causal=causal, blocks=list(cand[:4]),
                                    variant=cand.variant, ms=ms, rounds_median=True, ok=True,
                                    current=cand == current))
                best = min(medians.items(), key=lambda item: item[1])
        fa._HOPPER[(kind, d, causal)] = best[0] if best else current
        if best is not None:
            table.append(dict(kind=kind, head_dim=d, causal=causal, blocks=list(best[0][:4]),
                              variant=best[0].variant, ms=best[1], seq=args.seq))
            print(f"-> {kind} d={d} causal={causal}: {tuple(best[0])} {best[1]:.3f} ms",
                  flush=True)
        write()
        del ref
        torch.cuda.empty_cache()
    write()
    print(f"wrote {args.out} ({len(table)} entries, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
