"""Linear + cross-entropy over only the positions that carry a target.

span_cross_entropy(hidden [N, d], weight [V, d], targets [N]) = CE(hidden @ weight.T, targets)
with rows whose target is `ignore_index` dropped before the matmul (compaction), so the cost
follows the number of target positions (CM3's spans, SFT's outputs), not N.

Options (all computed in fp32):
  softcap          logits <- softcap * tanh(logits / softcap) before the loss
  label_smoothing  as torch.nn.functional.cross_entropy
  z_loss           adds z_loss * logsumexp(logits)^2 per target row (PaLM's auxiliary loss)
Reductions: "mean" over target rows (0.0 when there are none, never NaN), "sum", "none"
(a [N] tensor, zero on ignored rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.dispatch import Op

REDUCTIONS = ("mean", "sum", "none")


def check_args(hidden, weight, targets, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, d] and weight [V, d]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
              label_smoothing: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch: compact, materialise the [n_targets, V] logits in fp32, take the CE."""
    check_args(hidden, weight, targets, reduction)
    keep = targets != ignore_index
    rows = keep.nonzero().squeeze(1)
    logits = (hidden.index_select(0, rows) @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = targets.index_select(0, rows)
    loss = F.cross_entropy(logits, picked, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square()
    if reduction == "mean":
        return loss.sum() / max(rows.numel(), 1)
    if reduction == "sum":
        return loss.sum()
    return torch.zeros(hidden.shape[0], dtype=loss.dtype, device=loss.device).index_put((rows,), loss)


span_cross_entropy = Op("span_cross_entropy", reference)
