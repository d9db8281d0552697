"""bench/attention_targets.py reads a benchmark's rows against the flash-attention targets;
the rows here are the committed H100 runs 1 and 4 (bench/results/attention_h100.json)."""
from __future__ import annotations

import json
from pathlib import Path

from bench import attention_targets as targets

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "attention_h100.json"


def h100_rows(run: int = 1) -> list[dict]:
    (found,) = [r for r in json.loads(RESULTS.read_text())["runs"] if r["run"] == run]
    return found["bench_rows"]


def test_reads_the_committed_h100_run():
    lines, ok = targets.check(h100_rows())
    assert not ok                       # 427 TFLOP/s < 450
    assert lines[0] == "device: NVIDIA H100 80GB HBM3"
    assert "forward 427 TFLOP/s against the target 450: NOT met" in lines
    assert "backward 1.981 ms against sdpa-flash 2.742 ms: met" in lines


def test_reads_the_h100_run_that_meets_them():
    """Run 4 (session 14): the forward with TMA through host-made descriptors."""
    lines, ok = targets.check(h100_rows(run=4))
    assert ok, lines
    assert "forward 488 TFLOP/s against the target 450: met" in lines
    assert "backward 1.961 ms against sdpa-flash 2.742 ms: met" in lines


def test_both_targets_met(tmp_path):
    rows = h100_rows()
    for row in rows:
        if row["impl"] == "triton" and row["case"] == "fwd b=4 h=16 s=4096 d=128 causal":
            row["extra"]["TFLOP/s"] = 455.0
    lines, ok = targets.check(rows)
    assert ok, lines
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    assert targets.main([str(path)]) == 0


def test_slower_backward_fails():
    rows = h100_rows()
    for row in rows:
        if row["impl"] == "sdpa-flash" and row["case"] == "bwd b=4 h=16 s=4096 d=128 causal":
            row["time_ms"] = 1.0
    lines, ok = targets.check(rows)
    assert not ok and "backward 1.981 ms against sdpa-flash 1.000 ms: NOT met" in lines


def test_no_triton_rows_is_not_a_pass():
    rows = [r for r in h100_rows() if r["impl"] != "triton"]
    lines, ok = targets.check(rows)
    assert not ok and "no Triton rows" in lines[0]
