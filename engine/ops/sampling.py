"""cfg_sample: classifier-free guidance, CD-K, temperature, TopK and TopP, then one draw per row.

Row layout of `logits`:
  [B, V]   cfg_scale=None and cd_k=None: no guidance, every row samples from its own logits;
  [2B, V]  otherwise: rows [0, B) conditional, rows [B, 2B) unconditional (i pairs with B + i).
All per-row parameters are [B] tensors or Python scalars (broadcast). The math is fp32:
  guided = uncond + cfg_scale * (cond - uncond)     (scale 1 -> cond exactly, 0 -> uncond)
  CD-K (cd_k=(alpha, k), replaces the CFG mix): with p_c = softmax(cond), p_u = softmax(uncond),
    keep x with p_c(x) >= alpha * (k-th largest p_c), score log p_c(x) - log p_u(x).
  allowed [B, 2]: only ids in [start, end) may be drawn (image spans, text spans).
  temperature 0 -> greedy (argmax); else logits / temperature.
  top_k (0 = off): keep logits >= the k-th largest (ties at the cut are all kept).
  top_p (1 = off): over the top-k distribution, keep x iff the mass of tokens strictly more
    likely than x is < top_p (ties kept together; the most likely token always survives).
Returns (tokens int64 [B], logprobs fp32 [B]): the log-probability of each drawn token under
the distribution it was drawn from. NaN logits, or a row with no allowed finite logit, raise.
"""
from __future__ import annotations

import torch

from engine.ops.dispatch import Op


NAN_MESSAGE = "cfg_sample: logits contain NaN (the model diverged or the input is corrupt)"
EMPTY_MESSAGE = "cfg_sample: a row has no allowed token with a finite logit"


def _per_row(x, batch: int, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(batch).contiguous() if t.dim() == 0 else t


def normalise(logits, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0, allowed=None,
              cd_k=None):
    """Checks shapes and parameters (not the logits' values); returns
    (B, guided, scale, temp, k, p, allowed) as [B] fp32/int64 tensors and [B, 2] int64."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V] or [2B, V]; got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    guided = cfg_scale is not None or cd_k is not None
    if guided and rows % 2:
        raise ValueError(f"guided sampling needs [2B, V] logits (cond rows, then uncond); got {rows} rows")
    batch = rows // 2 if guided else rows
    if cd_k is not None and (int(cd_k[1]) < 1 or not float(cd_k[0]) > 0):
        raise ValueError(f"cd_k=(alpha, k) needs alpha > 0 and k >= 1; got {cd_k}")
    if cfg_scale is None:
        cfg_scale = 1.0
    dev = logits.device
    scale = _per_row(cfg_scale, batch, torch.float32, dev)
    temp = _per_row(temperature, batch, torch.float32, dev)
    k = _per_row(top_k, batch, torch.int64, dev)
    p = _per_row(top_p, batch, torch.float32, dev)
    if (temp < 0).any() or (k < 0).any() or ((p <= 0) | (p > 1)).any():
        raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    if allowed is None:
        allowed = torch.tensor([0, vocab], device=dev).expand(batch, 2)
    allowed = torch.as_tensor(allowed, device=dev).to(torch.int64).expand(batch, 2)
    return batch, guided, scale, temp, k, p, allowed


def prepare(logits, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0, allowed=None,
            cd_k=None):
    """`normalise` plus the NaN check the reference needs (the kernels check in-flight)."""
    out = normalise(logits, cfg_scale, temperature, top_k, top_p, allowed, cd_k)
    if torch.isnan(logits).any():
        raise ValueError(NAN_MESSAGE)
    return out


def guide(logits, batch, guided, scale, cd_k=None):
    """fp32 guided logits [B, V] from the (cond, uncond) rows."""
    cond = logits[:batch].float()
    if not guided:
        return cond
    uncond = logits[batch:].float()
    if cd_k is not None:
        alpha, k = cd_k
        lp_c = torch.log_softmax(cond, -1)
        lp_u = torch.log_softmax(uncond, -1)
        kth = lp_c.topk(min(int(k), lp_c.shape[1]), dim=-1).values[:, -1:]  # k may exceed V
        keep = lp_c >= kth + torch.log(torch.tensor(float(alpha)))
        # An id either model rules out is never kept (as in the CFG mix below); without
        # this, -inf - -inf made NaN scores when k exceeded the finite count.
        keep &= ~(torch.isneginf(cond) | torch.isneginf(uncond))
        return torch.where(keep, lp_c - lp_u, torch.tensor(float("-inf")))
    s = scale[:, None]
    mixed = uncond + s * (cond - uncond)
    mixed = torch.where(s == 1, cond, torch.where(s == 0, uncond, mixed))
    dead = torch.isneginf(cond) | torch.isneginf(uncond)
    return torch.where(dead, torch.tensor(float("-inf")), mixed)


def restrict(x, allowed):
    ids = torch.arange(x.shape[1], device=x.device)[None, :]
    inside = (ids >= allowed[:, :1]) & (ids < allowed[:, 1:])
    x = torch.where(inside, x, torch.tensor(float("-inf")))
    if torch.isneginf(x).all(-1).any():
        raise ValueError(EMPTY_MESSAGE)
    return x


def distribution(logits: torch.Tensor, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0,
                 allowed=None, cd_k=None):
    """Sort-based: (logp [B, V], greedy [B]): the log-probabilities each row draws from
    (-inf outside the TopK/TopP cut; greedy rows use temperature 1) and which rows are greedy."""
    batch, guided, scale, temp, k, p, allowed = prepare(logits, cfg_scale, temperature, top_k,
                                                        top_p, allowed, cd_k)
    x = restrict(guide(logits, batch, guided, scale, cd_k), allowed)
    greedy = temp == 0
    x = x / torch.where(greedy, 1.0, temp)[:, None]

    srt, order = x.sort(dim=-1, descending=True)
    kk = torch.where(k > 0, k.clamp(max=x.shape[1]), x.shape[1])
    kth = srt.gather(1, (kk - 1)[:, None])
    x = torch.where(x >= kth, x, torch.tensor(float("-inf")))

    probs = torch.softmax(x, -1)
    sp = probs.gather(1, order)
    before = sp.cumsum(-1) - sp                     # mass of tokens sorted ahead
    # Mass strictly greater than each value: the "before" mass at that value's first slot.
    first = torch.searchsorted(-sp, -sp, right=False)
    strictly_greater = before.gather(1, first)
    # p = 1 is "off": without the second term the fp32 cumsum, which can round up to 1
    # before the tail, dropped tokens of tiny probability from rows that asked for no cut.
    keep_sorted = (strictly_greater < p[:, None]) | (p[:, None] >= 1)
    keep_sorted[:, 0] = True
    pmin = torch.where(keep_sorted, sp, torch.tensor(float("inf"))).min(-1, keepdim=True).values
    x = torch.where(probs >= pmin, x, torch.tensor(float("-inf")))

    return torch.log_softmax(x, -1), greedy


def reference(logits: torch.Tensor, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0,
              allowed=None, generator: torch.Generator | None = None, cd_k=None):
    """Sort-based, obviously correct: the oracle the sort-free kernels are tested against."""
    logp, greedy = distribution(logits, cfg_scale, temperature, top_k, top_p, allowed, cd_k)
    # Uniforms are drawn for every row, greedy or not, so a row's draw does not depend on
    # the other rows' parameters.
    u = torch.rand(logp.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
    cdf = logp.exp().double().cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    drawn = drawn.clamp(max=logp.shape[1] - 1)
    tokens = torch.where(greedy, logp.argmax(-1), drawn)
    # Never land on a zero-probability id through the float rounding of the cdf's tail.
    bad = torch.isneginf(logp.gather(1, tokens[:, None]).squeeze(1))
    tokens = torch.where(bad, logp.argmax(-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


cfg_sample = Op("cfg_sample", reference)


# ---- fast backends: one schema (engine::cfg_sample) served by C++, CUDA and Triton ----
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATUS_MESSAGES = {1: NAN_MESSAGE, 2: EMPTY_MESSAGE}


def _kernel_call(kernel, logits, cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0,
                 allowed=None, generator: torch.Generator | None = None, cd_k=None):
    """Adapts the reference's signature to the kernels' flat one: per-row tensors, a seed
    drawn from `generator` (each row's uniform derives from (seed, row)), and per-row
    status codes turned into the reference's errors."""
    batch, guided, scale, temp, k, p, allowed = normalise(logits, cfg_scale, temperature,
                                                          top_k, top_p, allowed, cd_k)
    alpha, kk = (float(cd_k[0]), int(cd_k[1])) if cd_k is not None else (1.0, 0)
    gen_device = generator.device if generator is not None else logits.device
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device)
    tokens, logprobs, status = kernel(logits, scale, temp, k, p, allowed.contiguous(),
                                      seed.to(logits.device), guided, alpha, kk)
    if bool(status.any()):
        raise ValueError(_STATUS_MESSAGES.get(int(status.max()), "cfg_sample: kernel failed"))
    return tokens, logprobs


def _needs(device_ok, what: str):
    def supports(logits, *args, **kwargs) -> str | None:
        if not device_ok(logits):
            return f"needs {what} logits, got {logits.device}"
        if logits.dtype not in _LOGIT_DTYPES:
            return f"logits dtype {logits.dtype} is not fp32, fp16 or bf16"
        return None
    return supports


def _register_backends() -> None:
    import functools
    import os

    from engine import _native

    if not _native.AVAILABLE:
        cfg_sample.mark_unavailable("cpp", str(_native.LOAD_ERROR))
        cfg_sample.mark_unavailable("cuda", str(_native.LOAD_ERROR))
    elif not hasattr(torch.ops.engine, "cfg_sample"):
        cfg_sample.mark_unavailable("cpp", "engine._C has no cfg_sample op (stale build?)")
    else:
        op = torch.ops.engine.cfg_sample.default
        cfg_sample.register("cpp", functools.partial(_kernel_call, op),
                            _needs(lambda t: t.device.type == "cpu", "CPU"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("engine::cfg_sample", "CUDA"):
            cfg_sample.register("cuda", functools.partial(_kernel_call, op),
                                _needs(lambda t: t.is_cuda, "CUDA"))
        else:
            cfg_sample.mark_unavailable("cuda", "engine._C was built without CUDA")

    try:
        from kernels.cfg_sample import cfg_sample_triton
    except ImportError as exc:
        cfg_sample.mark_unavailable("triton", f"kernels.cfg_sample does not import: {exc}")
        return
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    def triton_supports(logits, *args, **kwargs) -> str | None:
        reason = _needs(lambda t: t.is_cuda or interpreted, "CUDA (or TRITON_INTERPRET=1)")(logits)
        if reason is None and not logits.is_cuda and logits.dtype == torch.bfloat16:
            return "bf16 arithmetic is wrong under the Triton interpreter; use fp32/fp16 on CPU"
        return reason

    cfg_sample.register("triton", functools.partial(_kernel_call, cfg_sample_triton),
                        triton_supports)


_register_backends()
