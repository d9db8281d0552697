"""Text -> image with CFG: the generation engine against a naive decode loop, images/s.

16 prompts x 1 image, classifier-free guidance (scale 3), TopP 0.9, the tiny preset's shapes
(4 layers, d=256, vocab 1,536, 64 codes per image, context 256) with random fp32 weights, on
the GPU when there is one (its paged decode, KV write and sampling kernels), else CPU; the
prompts all have 8 ids so the naive loop can batch them too. Both sides produce image codes
(the VQ decode, identical for both, is left out).
  naive   no KV cache: each step runs the full sequence of the conditional batch and, as a
          second forward, of the unconditional batch, then mixes and samples
  engine  engine.inference.decoder.decode: KV cache, cond and uncond rows in one step,
          one cfg_sample per step
`x ref` is the naive loop's time over the row's time, measured in the same run.
"""
from __future__ import annotations

import torch

from bench.common import Row, device_name, time_fn
from engine import ops
from engine.config import get_preset
from engine.inference.decoder import decode
from engine.inference.params import SamplingParams
from engine.inference.prompts import PreparedPrompt
from engine.model import Transformer
from engine.tokenizer.vocab import Vocab

N_PROMPTS = 16
PROMPT_IDS = 8
CFG = 3.0


@torch.no_grad()
def naive_generate(model, vocab: Vocab, conds: list[list[int]], tokens: int, generator) -> torch.Tensor:
    device = next(model.parameters()).device
    cond = torch.tensor(conds, device=device)
    uncond = torch.tensor([[vocab.bos, vocab.mask, vocab.brk]] * len(conds), device=device)
    allowed = torch.tensor([vocab.image_start, vocab.size], device=device)
    for _ in range(tokens):
        c = model.logits(model(cond)[:, -1])
        u = model.logits(model(uncond)[:, -1])
        tok, _ = ops.cfg_sample(torch.cat([c, u]), cfg_scale=CFG, top_p=0.9, allowed=allowed,
                                generator=generator)
        cond = torch.cat([cond, tok[:, None]], 1)
        uncond = torch.cat([uncond, tok[:, None]], 1)
    return cond[:, -tokens:]


def run(quick: bool) -> list[Row]:
    cfg = get_preset("tiny")
    vocab = Vocab.from_config(cfg.vocab)
    tpi = cfg.image.tokens_per_image
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab.size).eval().to(device)
    g = torch.Generator().manual_seed(0)
    conds = [[vocab.bos] + torch.randint(vocab.bpe_start, vocab.image_start, (PROMPT_IDS - 2,),
                                         generator=g).tolist() + [vocab.brk] for _ in range(N_PROMPTS)]
    prompts = [PreparedPrompt("", [], c, [vocab.bos, vocab.mask, vocab.brk], None) for c in conds]
    params = SamplingParams(cfg_scale=CFG, top_p=0.9, modality="image")

    def engine():
        return decode(model, vocab, tpi, prompts, params,
                      torch.Generator(device=device).manual_seed(1))

    def naive():
        return naive_generate(model, vocab, conds, tpi,
                              torch.Generator(device=device).manual_seed(1))

    reps = 2 if quick else 5
    dev = device_name(device)
    # one call is a whole generation (~0.1-1 s): on CUDA about 2 s of calls each
    t_naive = time_fn(naive, device, warmup=1, reps=reps, min_time_s=0.0, cuda_ms=2000)
    t_engine = time_fn(engine, device, warmup=1, reps=reps, min_time_s=0.0, cuda_ms=2000)
    case = f"{N_PROMPTS} prompts x 1 image, cfg {CFG:g}, tiny shapes"
    return [
        Row("generation", case, "naive", t_naive, 1.0,
            extra={"images_per_s": N_PROMPTS / (t_naive / 1e3)}, device=dev),
        Row("generation", case, "engine", t_engine, t_naive / t_engine,
            extra={"images_per_s": N_PROMPTS / (t_engine / 1e3)}, device=dev),
    ]
