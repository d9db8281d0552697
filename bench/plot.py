"""Bar chart of each implementation's speed relative to its reference (same run)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ratio_bars(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r["ratio"] is not None and r["impl"] != "reference"]
    labels = [f"{r['bench']} {r['case']}\n{r['impl']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the reference (same run)")
    devices = sorted({r["device"] for r in rows if r["device"]})
    ax.set_title("; ".join(devices) or "benchmarks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
