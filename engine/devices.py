"""A requested device (and inference dtype) checked up front, so that `--device cuda` on a
machine without a GPU is one clear sentence before any work starts instead of torch's
assertion deep inside it."""
from __future__ import annotations

import torch


def check_device(name: str | torch.device | None) -> None:
    """Raise ValueError when `name` (None = the default choice, always fine) names a device
    this machine cannot use."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else \
            "no CUDA GPU is visible"
        raise ValueError(f"device {name!r}: {why} (torch {torch.__version__}); use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPUs")


# The weights (and KV cache) inference runs in; the logits are fp32 either way.
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in INFERENCE_DTYPES.values():
        return dtype
    if dtype in INFERENCE_DTYPES:
        return INFERENCE_DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r}: inference runs in {' or '.join(INFERENCE_DTYPES)}")
