"""span_cross_entropy, forward + backward: the plain loss vs the reference vs the fused paths.

Half the rows carry no target (ignore_index), as in CM3 / SFT batches. Every timed call
computes the loss and both gradients (d_hidden, d_weight) with torch.autograd.grad, so
peak memory includes the gradients themselves (d_weight alone is V x d).
  plain      F.cross_entropy(hidden @ weight.T, targets): all N rows, full logits
  reference  engine's reference: compaction, then full fp32 logits of the target rows
  chunked    auto's pick: compaction, blocks of rows, O(block x V) memory; the BLAS's
             matmuls with a row pass between them (CUDA: kernels/cross_entropy_rows.py)
  triton     kernels/span_cross_entropy.py (CUDA): logits never leave registers
  liger / cce  LigerFusedLinearCrossEntropyLoss / cut_cross_entropy.linear_cross_entropy
             (its default gradient filter; cce-exact without it), when importable (skipped
             otherwise; scripts/peer_wheels.sh fetches them for the GPU machine)
CPU: N=8,192, d=1,024, V=64,512 fp32 (quick: N=1,024). CUDA: N=8,192 and 32,768, d=4,096,
V=64,512 bf16. `x ref` is the reference's time over the row's; extras give time and peak
memory relative to the plain loss and, on CUDA, TFLOP/s of the useful work
(6 * targets * d * V) against the bf16 dense peak.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import Row, device_name, peak_memory_mb, time_fn
from engine.ops import span_cross_entropy

IGNORE = -100
V = 64_512
H100_BF16_PEAK_TFLOPS = 989.0


def _inputs(n, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[: n // 2]] = IGNORE
    return hidden, weight, targets.to(device)


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE)


def _engine(backend):
    return lambda hidden, weight, targets: span_cross_entropy(hidden, weight, targets,
                                                              backend=backend)


def _peers() -> dict[str, Callable]:
    peers = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        peers["liger"] = lambda hidden, weight, targets: liger(weight, hidden, targets)
    except ImportError as exc:
        print(f"span_loss: skipping liger ({exc})")
    try:
        from cut_cross_entropy import linear_cross_entropy
        # CCE filters small gradients by default (approximate); cce-exact turns that off,
        # which is what our fused kernel computes unless asked
        peers["cce"] = lambda hidden, weight, targets: linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE)
        peers["cce-exact"] = lambda hidden, weight, targets: linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE, filter_eps=None)
    except ImportError as exc:
        print(f"span_loss: skipping cce ({exc})")
    return peers


def _measure(loss_fn, inputs, device, reps):
    hidden, weight, targets = inputs

    def step():
        return torch.autograd.grad(loss_fn(hidden, weight, targets), [hidden, weight])

    gc.collect()
    mem = peak_memory_mb(step, device)
    if device.type == "cuda":
        ms = time_fn(step, device)
    else:  # one call takes seconds at full size: two warm-ups are plenty, and few reps
        ms = time_fn(step, device, warmup=1, reps=reps, min_time_s=0.0)
    return ms, mem


def _case(n, d, dtype, device, impls, reps, note="") -> list[Row]:
    inputs = _inputs(n, d, dtype, device)
    n_targets = int((inputs[2] != IGNORE).sum())
    results = {name: _measure(fn, inputs, device, reps) for name, fn in impls.items()}
    ref_ms = results["reference"][0]
    plain_ms, plain_mem = results["plain"]
    case = f"N={n} (targets {n_targets}) d={d} V={V} {str(dtype).removeprefix('torch.')}{note}"
    rows = []
    for name, (ms, mem) in results.items():
        extra = {"time_vs_plain": ms / plain_ms, "mem_vs_plain": mem / max(plain_mem, 1e-9)}
        if device.type == "cuda":
            tflops = 6 * n_targets * d * V / (ms * 1e-3) / 1e12
            extra["TFLOP/s"] = tflops
            extra["%peak"] = 100 * tflops / H100_BF16_PEAK_TFLOPS
        rows.append(Row("span_loss", case, name, ms, ref_ms / ms, mem, extra,
                        device_name(device)))
    return rows


def run(quick: bool) -> list[Row]:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        impls = {"plain": _plain, "reference": _engine("reference"),
                 "chunked": _engine("chunked"), "triton": _engine("triton"), **_peers()}
        sizes = [8_192] if quick else [8_192, 32_768]
        return [row for n in sizes
                for row in _case(n, 4_096, torch.bfloat16, device, impls, reps=10)]
    impls = {"plain": _plain, "reference": _engine("reference"), "chunked": _engine("chunked")}
    n = 1_024 if quick else 8_192
    return _case(n, 1_024, torch.float32, torch.device("cpu"), impls, reps=2 if quick else 3,
                 note=" (quick: N shrunk from 8192)" if quick else "")
