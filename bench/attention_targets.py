"""Read an attention benchmark (bench/run.py --json) against the flash-attention targets.

  python bench/attention_targets.py OUT/bench_attention.json

The targets (from the flash-attention issue, H100 bf16): the Triton forward at causal, head
dim 128, sequence 4,096 reaches at least 450 TFLOP/s, and the Triton backward there is no
slower than SDPA's flash backend. Both compare rows of one run (same device, same harness);
the printout names the device, so a number from another card is never read as an H100's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORWARD_TFLOPS = 450.0
CASE = "s=4096 d=128 causal"


def headline(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """{(pass, impl): row} for the target shape (forward and backward)."""
    found = {}
    for row in rows:
        kind, _, rest = row["case"].partition(" ")
        if row["bench"] == "attention" and kind in ("fwd", "bwd") and rest.endswith(CASE):
            found[(kind, row["impl"])] = row
    return found


def check(rows: list[dict]) -> tuple[list[str], bool]:
    """Lines to print, and whether both targets are met."""
    found = headline(rows)
    if ("fwd", "triton") not in found or ("bwd", "triton") not in found:
        return [f"no Triton rows at {CASE} (a CPU run, or --quick?)"], False
    device = found[("fwd", "triton")]["device"]
    lines = [f"device: {device}", f"{CASE}, TFLOP/s (ms):"]
    for kind in ("fwd", "bwd"):
        for (k, impl), row in sorted(found.items()):
            if k == kind:
                tiles = row["extra"].get("tiles", "")
                lines.append(f"  {kind} {impl:<15} {row['extra']['TFLOP/s']:6.0f} "
                             f"({row['time_ms']:.3f}) {tiles}")
    fwd = found[("fwd", "triton")]["extra"]["TFLOP/s"]
    fwd_ok = fwd >= FORWARD_TFLOPS
    lines.append(f"forward {fwd:.0f} TFLOP/s against the target {FORWARD_TFLOPS:.0f}: "
                 f"{'met' if fwd_ok else 'NOT met'}")
    flash = found.get(("bwd", "sdpa-flash"))
    if flash is None:
        lines.append("backward: no sdpa-flash row to compare with")
        return lines, False
    bwd, ref = found[("bwd", "triton")]["time_ms"], flash["time_ms"]
    bwd_ok = bwd <= ref
    lines.append(f"backward {bwd:.3f} ms against sdpa-flash {ref:.3f} ms: "
                 f"{'met' if bwd_ok else 'NOT met'}")
    return lines, fwd_ok and bwd_ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="a bench/run.py --json file")
    args = ap.parse_args(argv)
    try:
        rows = json.loads(args.json.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        ap.error(f"cannot read benchmark rows from {args.json}: {exc}")
    lines, ok = check(rows)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
