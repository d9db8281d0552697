"""Run the kernel benchmarks: each op against its reference (and peers), ratios in one run.

  python bench/run.py                 every benchmark module under bench/
  python bench/run.py --quick         short CPU-sized run
  python bench/run.py --only sampling,span_loss --json out.json --png out.png

Every module in bench/ that defines `run(quick: bool) -> list[Row]` is a benchmark. The
table shows time, the ratio against the reference measured in the same run (> 1 = faster),
peak memory and per-benchmark extras (TFLOP/s, GB/s, % of device peak).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run", "common", "plot", "attention_targets"}


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)])
                  if m.name not in NOT_BENCHMARKS and not m.name.startswith("_"))


def format_table(rows: list[dict]) -> str:
    head = ["bench", "case", "impl", "time ms", "x ref", "peak MiB", "extra"]
    lines = []
    for r in rows:
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r["extra"].items())
        lines.append([r["bench"], r["case"], r["impl"], f"{r['time_ms']:.3f}",
                      "" if r["ratio"] is None else f"{r['ratio']:.2f}",
                      "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}", extra])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def git_commit() -> str:
    """HEAD, with "+dirty" when the tree differs from it (then HEAD alone would name code
    that was not what ran, e.g. a working tree copied to a GPU machine)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, text=True, capture_output=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short CPU-sized run")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(names)}")
    ap.add_argument("--json", type=Path, help="also write the rows, device and commit as JSON")
    ap.add_argument("--png", type=Path, help="also draw the ratios as a bar chart")
    args = ap.parse_args(argv)

    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")

    sys.path.insert(0, str(HERE.parent))
    rows, failed = [], []
    for name in chosen:
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            rows += [r.as_dict() for r in module.run(quick=args.quick)]
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
    if rows:
        print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"commit": git_commit(), "quick": args.quick,
                                         "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.png and rows:
        from bench.plot import ratio_bars
        ratio_bars(rows, args.png)
        print(f"wrote {args.png}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
