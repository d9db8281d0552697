"""cfg_sample: the sort-based reference against the sort-free kernels (and FlashInfer).

Vocab 64,512 (the paper's), batch 1/16/64/256, CFG guidance (scale 3) and temperature 0.8,
with TopP 0.9 alone and TopK 256 + TopP 0.9. CPU: reference vs cpp. CUDA (bf16 logits):
reference vs cuda vs triton, and FlashInfer's top_k_top_p_sampling_from_logits on the
already-guided logits when it imports (it does no CFG mix, so it gets the mix for free and
its row is a lower bound). GB/s counts the logits read once.
"""
from __future__ import annotations

import torch

from bench.common import Row, device_name, time_fn
from engine.ops.sampling import cfg_sample

VOCAB = 64512
SETTINGS = {"top_p=0.9": dict(top_p=0.9), "top_k=256,top_p=0.9": dict(top_k=256, top_p=0.9)}


def _flashinfer(logits: torch.Tensor, batch: int, kw: dict):
    try:
        import flashinfer
    except ImportError:
        return None
    guided = logits[batch:].float() + 3.0 * (logits[:batch].float() - logits[batch:].float())
    guided = guided / 0.8
    k = kw.get("top_k", VOCAB)
    return lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(guided, k, kw["top_p"])


def _bench_device(device: str, batches: list[int], impls: list[str], reps: int) -> list[Row]:
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = device_name(device)
    for batch in batches:
        logits = torch.randn(2 * batch, VOCAB, device=device).mul_(2.0).to(dtype)
        gbytes = logits.numel() * logits.element_size() / 1e9
        for setting, kw in SETTINGS.items():
            case = f"B={batch} V={VOCAB} {setting}"
            times = {}
            for impl in impls:
                fn = (lambda impl=impl: cfg_sample(logits, cfg_scale=3.0, temperature=0.8,
                                                   backend=impl, **kw))
                times[impl] = time_fn(fn, device, reps=reps, min_time_s=0.1)
            peer = _flashinfer(logits, batch, kw) if device == "cuda" else None
            if peer is not None:
                times["flashinfer"] = time_fn(peer, device, reps=reps)
            for impl, ms in times.items():
                rows.append(Row("sampling", case, impl, ms, ratio=times["reference"] / ms,
                                extra={"GB/s": gbytes / (ms / 1e3), "dtype": str(dtype)[6:]},
                                device=name))
    return rows


def run(quick: bool) -> list[Row]:
    batches = [1, 16, 64] if quick else [1, 16, 64, 256]
    reps = 3 if quick else 10
    available = cfg_sample.available()
    rows = []
    if "cpp" in available:
        rows += _bench_device("cpu", batches, ["reference", "cpp"], reps)
    if torch.cuda.is_available():
        impls = ["reference"] + [b for b in ("cuda", "triton") if b in available]
        rows += _bench_device("cuda", batches, impls, reps)
    return rows
