"""Paged decode attention against its gather+SDPA reference, and paged against contiguous
KV caches end to end.

Kernel rows. CPU: B=16, context 1,024, H=H_kv=8, d=64, block 16, fp32: reference vs cpp.
GPU: B=64, context 4,096, H=32, H_kv=8, d=128, block 16, bf16: reference vs cuda vs triton,
and FlashInfer's BatchDecodeWithPagedKVCacheWrapper when it imports. GB/s counts the K/V
bytes the call must read once (q and the output are < 0.1% of it); % of peak uses the HBM
bandwidth of the named device (H100 3.35 TB/s, H200 4.8 TB/s).

End to end: 64 concurrent CFG image requests with n=4 samples, i.e. per request 4
conditional rows (its prompt) and 4 unconditional rows ("<bos> <mask> <break>"), greedy
tokens per row (the CFG mix costs the same in both paths and is left out). Contiguous: the
generation engine's RowBatch (one preallocated cache per prompt-length group, every row its
own copy). Paged: the Scheduler over one KVPool (each request's n samples forked from one
prefill, every sample a row of one decode forward), and the engine's default RowBatch over
PagedRows (same rows as contiguous, repeated prompts forked, block 16). Peak cache memory: bytes of KV storage
allocated (contiguous) vs the most blocks ever in use (paged). Quick mode is CPU-sized: the
tiny preset with random weights and 16 image tokens instead of 64.
"""
from __future__ import annotations

import dataclasses
import random
import time

import torch

from bench.common import Row, device_name, time_fn
from engine.ops.paged_attention import paged_decode_attention

HBM_PEAK_TBS = {"H100": 3.35, "H200": 4.8}


def _case(batch, context, heads, kv_heads, d, block, dtype, device):
    blocks = batch * context // block
    k = torch.randn(blocks, block, kv_heads, d, device=device).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, d, device=device).to(dtype)
    tables = torch.randperm(blocks, device=device).view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def _flashinfer(q, k, v, tables, lens, block):
    try:
        import flashinfer
    except ImportError:
        return None
    batch, heads, d = q.shape
    kv_heads = k.shape[2]
    per = tables.shape[1]
    indptr = torch.arange(0, batch * per + 1, per, dtype=torch.int32, device=q.device)
    last = ((lens - 1) % block + 1).to(torch.int32)
    ws = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    wrapper.plan(indptr, tables.flatten(), last, heads, kv_heads, d, block, data_type=q.dtype)
    return lambda: wrapper.run(q, (k, v))


def kernel_rows(device: str, quick: bool) -> list[Row]:
    on_gpu = device == "cuda"
    batch, context, heads, kv_heads, d = (64, 4096, 32, 8, 128) if on_gpu else (16, 1024, 8, 8, 64)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    block = 16
    q, k, v, tables, lens = _case(batch, context, heads, kv_heads, d, block, dtype, device)
    gbytes = 2 * k.numel() * k.element_size() / 1e9
    name = device_name(device)
    peak = next((tbs for key, tbs in HBM_PEAK_TBS.items() if key in name), None)
    impls = [b for b in ("reference", "cpp", "cuda", "triton") if b in paged_decode_attention.available()
             and paged_decode_attention.backends[b].supports(q, k, v, tables, lens) is None]
    if not on_gpu:
        impls = [b for b in impls if b != "triton"]      # the interpreter is not a fast path
    reps = 3 if quick else 10
    times = {b: time_fn(lambda b=b: paged_decode_attention(q, k, v, tables, lens, backend=b), device,
                        reps=reps, min_time_s=0.1) for b in impls}
    peer = _flashinfer(q, k, v, tables, lens, block) if on_gpu else None
    if peer is not None:
        times["flashinfer"] = time_fn(peer, device)
    case = f"decode B={batch} ctx={context} H={heads}/{kv_heads} d={d} blk={block} {str(dtype)[6:]}"
    rows = []
    for impl, ms in times.items():
        extra = {"GB/s": gbytes / (ms / 1e3)}
        if peak:
            extra["% HBM peak"] = 100 * extra["GB/s"] / (peak * 1e3)
        rows.append(Row("paged_attention", case, impl, ms, ratio=times["reference"] / ms, extra=extra, device=name))
    return rows


# ---- end to end ----------------------------------------------------------------------------
def _requests(n_requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 1000) for _ in range(rng.randint(8, 40))] for _ in range(n_requests)]


UNCOND = [1, 2, 3]    # stands for <bos> <mask> <break>


def _contiguous(model, prompts, n, tokens):
    from engine.inference.row_batch import RowBatch
    rows = [p for p in prompts for _ in range(n)] + [UNCOND] * (n * len(prompts))
    batch = RowBatch(model, rows, tokens, use_cache="contiguous")
    cache_bytes = sum(t.numel() * t.element_size() for g in batch.groups for t in g.cache.k + g.cache.v)
    logits = batch.prefill()
    for _ in range(tokens - 1):
        logits = batch.step(dict(enumerate(logits.argmax(-1).tolist())))
    return cache_bytes


def _engine_paged(model, prompts, n, tokens):
    """The generation engine's default: RowBatch over PagedRows (repeated prompts forked)."""
    from engine.inference.row_batch import RowBatch
    rows = [p for p in prompts for _ in range(n)] + [UNCOND] * (n * len(prompts))
    batch = RowBatch(model, rows, tokens, use_cache="paged")
    logits = batch.prefill()
    peak = batch.paged.pool.bytes_in_use()
    for _ in range(tokens - 1):
        logits = batch.step(dict(enumerate(logits.argmax(-1).tolist())))
        peak = max(peak, batch.paged.pool.bytes_in_use())
    return peak


def _paged(model, prompts, n, tokens, block):
    from engine.inference.paged_cache import KVPool
    from engine.inference.scheduler import Request, Scheduler
    per_row = -(-(max(len(p) for p in prompts) + tokens) // block)
    pool = KVPool.for_model(model, num_blocks=2 * n * len(prompts) * per_row, block_size=block)
    sched = Scheduler(model, pool, max_running=len(prompts) + 1, max_queue=len(prompts) + 1)
    for p in prompts:
        sched.submit(Request(p, tokens, n=n))
    # Every request's unconditional rows are the same prompt: one prefill, forked to all.
    sched.submit(Request(UNCOND, tokens, n=n * len(prompts)))
    peak = 0
    while not sched.idle:
        sched.step()
        peak = max(peak, pool.bytes_in_use())
    return peak


def e2e_rows(device: str, quick: bool) -> list[Row]:
    from engine.config import get_preset
    from engine.model import Transformer
    cfg = get_preset("tiny" if quick or device == "cpu" else "small")
    model_cfg = dataclasses.replace(cfg.model, max_seq_len=128 if quick else cfg.model.max_seq_len)
    torch.manual_seed(0)
    model = Transformer(model_cfg, cfg.vocab.text_size + cfg.vocab.image_codes + 64).to(device).eval()
    tokens = 8 if quick else cfg.image.tokens_per_image
    block = 8 if quick else 16      # short CPU-sized sequences waste less of a small block
    n, n_requests = 4, 64
    prompts = _requests(n_requests)
    case = (f"e2e {n_requests} CFG requests n={n} {tokens} tokens blk={block} "
            f"({cfg.preset}{', quick CPU-sized' if quick else ''})")
    rows_per_step = 2 * n * n_requests
    out = {}
    for impl, fn in (("contiguous", _contiguous), ("paged scheduler", lambda *a: _paged(*a, block)),
                     ("paged engine (blk=16)", _engine_paged)):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mem = fn(model, prompts, n, tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        out[impl] = ((time.perf_counter() - t0) * 1e3, mem)
    base_ms = out["contiguous"][0]
    return [Row("paged_attention", case, impl, ms, ratio=base_ms / ms, peak_mem_mb=mem / 2**20,
                extra={"tok/s": rows_per_step * tokens / (ms / 1e3)}, device=device_name(device))
            for impl, (ms, mem) in out.items()]


def run(quick: bool) -> list[Row]:
    # One thread count for every implementation (torch and the OpenMP kernels share it).
    torch.set_num_threads(torch.get_num_threads())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        rows += kernel_rows(device, quick)
        rows += e2e_rows(device if device == "cuda" else "cpu", quick)
    return rows
