"""The flash-attention kernels' launch order measured: head by head against groups of heads
sized by an L2 budget (kernels/flash_attention_order.py), causal, forward and backward (GPU only).

  python scripts/attention_launch_order.py [--seqs 1024,4096,16384] [--budgets-mib 0,4,16,48]
                                           [--head-dim 128] [--json PATH]

Budget 0 is the head-by-head order (every kernel before the grouped order existed); the
default budget is kernels.flash_attention_order.L2_BUDGET_BYTES. Shapes are bench/attention.py's
(b * s = 16k tokens, h * d = 2048). The budgets are timed in turn, twice over in opposite
order, and each gets the mean of its two medians, so a clock that drifts during the run
favours none of them. The last line names the budget with the best geometric-mean speed over
every pass and length (bench/gpu.sh sets ENGINE_FLASH_L2_BUDGET_MIB to it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import flash_attention as fa  # noqa: E402
from kernels import flash_attention_order as order  # noqa: E402


def passes(s: int, d: int):
    """The forward and backward ops at bench/attention.py's shape, as zero-argument calls."""
    b, h = 16384 // s, 2048 // d
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                  for _ in range(4))
    scale = d ** -0.5
    out, lse = fa.flash_attention_fwd(q, k, v, True, scale)
    flops = 4 * b * h * s * s * d / 2
    return {"fwd": (lambda: fa.flash_attention_fwd(q, k, v, True, scale), flops),
            "bwd": (lambda: fa.flash_attention_bwd(g, None, q, k, v, out, lse, True, scale),
                    2.5 * flops)}, (b, h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--budgets-mib", default=f"0,4,{order.L2_BUDGET_BYTES // 2**20},48")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton.testing

    default = order.L2_BUDGET_BYTES
    budgets = [int(x) * 2**20 for x in args.budgets_mib.split(",")]
    d = args.head_dim
    results = []
    print(f"{torch.cuda.get_device_name()}  causal d={d} bf16; default budget {default >> 20} MiB")
    try:
        for s in (int(x) for x in args.seqs.split(",")):
            calls, (b, h) = passes(s, d)
            for kind, (fn, flops) in calls.items():
                ms = {budget: [] for budget in budgets}
                for sweep in (budgets, budgets[::-1]):
                    for budget in sweep:
                        order.L2_BUDGET_BYTES = budget
                        fn()   # compiles a head-group-of-one specialisation the first time
                        ms[budget].append(triton.testing.do_bench(
                            fn, warmup=25, rep=100, return_mode="median"))
                base = sum(ms[0]) / 2 if 0 in ms else None
                for budget, times in ms.items():
                    order.L2_BUDGET_BYTES = budget
                    kv_bytes = 2 * s * d * 2
                    group = order.head_group(b * h, kv_bytes, True)
                    mean = sum(times) / 2
                    tflops = flops / (mean * 1e-3) / 1e12
                    vs = f"  x{base / mean:.3f} vs head by head" if base else ""
                    print(f"  s={s:<6} {kind} budget {budget >> 20:>3} MiB (groups of {group:>3} "
                          f"heads): {mean:.4f} ms {tflops:6.1f} TFLOP/s{vs}")
                    results.append(dict(seq=s, head_dim=d, kind=kind, budget_mib=budget >> 20,
                                        head_group=group, ms=times, tflops=tflops))
    finally:
        order.L2_BUDGET_BYTES = default
    best = max(budgets, key=lambda budget: sum(math.log(r["tflops"]) for r in results
                                               if r["budget_mib"] == budget >> 20))
    print(f"best budget: {best / 2**20:g} MiB")
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                             best_budget_mib=best / 2**20, results=results),
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
