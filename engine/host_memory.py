"""Keep freed host memory in the process for reuse, instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (128 KiB at first) with a fresh mmap
and unmaps it on free, so each training step's large temporaries come back as new pages the
kernel must fault in and zero. On the tiny preset's VQ-VAE step (2 CPU threads) that was
thousands of page faults a step; with the thresholds below, a few (tests/test_host_memory.py
counts them: ~90,000 against ~1,000 over ten steps). Numerics are untouched: only where the
bytes live changes.

The price is that the process keeps its peak heap (up to TRIM_THRESHOLD bytes beyond what
is in use) instead of shrinking after a spike, which a training process wants anyway.
Only glibc has mallopt; elsewhere this does nothing and logs that it did nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20    # glibc's ceiling for it on 64-bit: larger blocks still get mmap
TRIM_THRESHOLD = 1 << 30     # keep up to 1 GiB of freed memory at the top of the heap

log = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it took effect."""
    if not sys.platform.startswith("linux"):
        log.info("host memory: not Linux (no glibc mallopt); allocator left as it is")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("host memory: no glibc mallopt here; allocator left as it is")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
