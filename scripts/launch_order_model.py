"""A model of how the GPU runs a causal flash-attention grid, to compare launch orders
without a GPU (kernels/flash_attention_order.py; scripts/attention_launch_order.py measures).

  python scripts/launch_order_model.py [--sms 132] [--solo 0.65]

Model: each SM holds up to `per_sm` programs (the tile's occupancy) and starts the next
program in launch order as soon as one finishes; programs on an SM share its rate, and a
lone program runs at `solo` of it (one program cannot keep every unit busy). A program's
work is the number of key (or query) blocks it visits, plus a fixed cost for its prologue
and epilogue. The efficiency printed is the ideal time (all work spread evenly) over the
modelled time. It ignores memory: the L2 budget only decides the group sizes. For the
forward it also gives the causal forward's TFLOP/s over the full forward's (both modelled,
the full one with its own last-wave tail), which an H100 run measures directly: session 5's
run 1, head by head, read 0.80 / 0.91 / 1.00 at 1k / 4k / 16k, and this model says 0.83 /
0.93 / 1.01 (bench/results/attention_h100.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.flash_attention_order import head_group  # noqa: E402

FIXED_COST = 1.5      # prologue + epilogue, in key-block visits
MASKED_EXTRA = 0.3    # the diagonal block's mask, in key-block visits


def launch_order(costs_per_block: list[float], heads: int, group: int) -> list[float]:
    """Program costs in launch order: heaviest block first, `group` heads at a time."""
    blocks = sorted(range(len(costs_per_block)), key=lambda i: -costs_per_block[i])
    return [costs_per_block[blk] for start in range(0, heads, group) for blk in blocks
            for _ in range(start, min(start + group, heads))]


def modelled_time(costs: list[float], sms: int, per_sm: int, solo: float) -> float:
    running = [[] for _ in range(sms)]
    queue = iter(costs)
    pending = next(queue, None)
    now = 0.0
    while True:
        for sm in running:                      # fill free slots in launch order
            while len(sm) < per_sm and pending is not None:
                sm.append(pending)
                pending = next(queue, None)
        rates = [(1.0 if len(sm) == per_sm else solo) / len(sm) if sm else 0.0 for sm in running]
        steps = [min(sm) / r for sm, r in zip(running, rates) if sm]
        if not steps:
            return now
        step = min(steps)
        now += step
        for i, sm in enumerate(running):
            running[i] = [w - step * rates[i] for w in sm if w - step * rates[i] > 1e-9]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=132, help="H100 SXM: 132")
    ap.add_argument("--solo", type=float, default=0.65)
    args = ap.parse_args(argv)
    d = 128
    # (pass, rows per program, blocks visited per step, programs per SM): the Hopper table's
    # causal d=128 tiles (kernels/flash_attention.py).
    passes = (("fwd", 64, 64, 2), ("dq", 128, 64, 1), ("dkdv", 128, 64, 1))
    print(f"causal d={d} bf16, b*s = 16k, h*d = 2048; {args.sms} SMs, lone program at "
          f"{args.solo:.0%}; efficiency = ideal / modelled time")
    for s in (1024, 4096, 16384):
        heads = (16384 // s) * (2048 // d)
        group = head_group(heads, 2 * s * d * 2, causal=True)   # bf16 K and V of one head
        for name, rows, step, per_sm in passes:
            n = s // rows
            if name == "dkdv":     # key block j is seen by the queries from j * rows on
                costs = [(s - j * rows) / step + MASKED_EXTRA + FIXED_COST for j in range(n)]
            else:                  # query block i sees the keys up to its last row
                costs = [(i + 1) * rows / step + MASKED_EXTRA + FIXED_COST for i in range(n)]
            ideal = sum(costs) * heads / args.sms
            eff = {g: ideal / modelled_time(launch_order(costs, heads, g), args.sms, per_sm,
                                            args.solo) for g in (1, group)}
            line = (f"  s={s:<6} {name:<5} head by head {eff[1]:.3f}   groups of {group:>3} "
                    f"heads {eff[group]:.3f}")
            if name == "fwd":
                # TFLOP/s of the causal forward over the full one's (which has no tail and
                # no diagonal): FLOPs count half the full square, the time follows the costs.
                full = [n * rows / step + FIXED_COST] * n
                full_eff = sum(full) * heads / args.sms / modelled_time(
                    launch_order(full, heads, 1), args.sms, per_sm, args.solo)
                useful = n * n * rows / step      # the full square, in key-block visits
                ratio = {g: (useful / 2 * eff[g] / sum(costs)) / (useful * full_eff / sum(full))
                         for g in (1, group)}
                line += f"   causal/full TFLOP/s {ratio[1]:.2f} -> {ratio[group]:.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
