"""The cached, grouped decode loop against full-recompute oracles, and CFG's endpoints."""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.inference.decoder import decode
from engine.inference.params import SamplingParams
from engine.inference.prompts import PreparedPrompt

PROMPTS = ["a red circle", "a blue square on the left", "a small green triangle", "make it blue"]


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits by a full forward without any cache: the oracle."""
    with torch.no_grad():
        return model.logits(model(torch.tensor([ids]))[:, -1])[0]


def _tokens(results):
    return [s.token_ids for r in results for s in r.samples]


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_greedy_with_cache_equals_full_recompute(engine, batch, modality):
    params = SamplingParams(temperature=0, modality=modality, max_new_tokens=None if modality == "image" else 20,
                            cfg_scale=3.0 if modality == "image" else 1.0)
    prompts = PROMPTS[:batch]
    cached = engine.generate(prompts, params)
    recomputed = engine.generate(prompts, params, use_cache=False)
    assert _tokens(cached) == _tokens(recomputed)


def test_greedy_text_matches_a_hand_written_loop(engine, gqa_engine):
    """Independent of the engine's loop: argmax over allowed text ids, one full forward per step."""
    for eng in (engine, gqa_engine):
        v = eng.vocab
        params = SamplingParams(temperature=0, modality="text", max_new_tokens=12, cfg_scale=1.0)
        results = eng.generate(PROMPTS[:3], params)
        for prompt, r in zip(PROMPTS, results):
            ids = eng.prepare(prompt, params).cond
            out = []
            for _ in range(12):
                logits = _full_logits(eng.model, ids)
                logits[[v.pad, v.bos, v.mask]] = float("-inf")
                logits[v.sentinel_start:v.bpe_start] = float("-inf")
                logits[:v.eos] = float("-inf")
                if ids[-1] != v.brk:
                    logits[v.image_start:] = float("-inf")
                t = int(logits.argmax())
                out.append(t)
                ids = ids + [t]
                if t == v.eos or v.is_image(t):
                    break   # an opened span continues under constraints tested elsewhere
            assert r.samples[0].token_ids[:len(out)] == out


@pytest.mark.parametrize("sampled", [False, True])
def test_paired_rows_equal_two_separate_passes_mixed_by_hand(engine, sampled):
    v, tpi, scale = engine.vocab, engine.tokens_per_image, 2.5
    params = SamplingParams(temperature=1.0 if sampled else 0.0, top_p=0.9, top_k=50,
                            cfg_scale=scale, seed=7)
    results = engine.generate(PROMPTS, params)
    gen = torch.Generator().manual_seed(7)
    conds = [engine.prepare(p, params).cond for p in PROMPTS]
    unconds = [[v.bos, v.mask, v.brk] for _ in PROMPTS]
    allowed = torch.tensor([v.image_start, v.size])
    for _ in range(tpi):
        c = torch.stack([_full_logits(engine.model, ids) for ids in conds])
        u = torch.stack([_full_logits(engine.model, ids) for ids in unconds])
        if sampled:
            tok, _ = ops.cfg_sample(torch.cat([c, u]), cfg_scale=scale, temperature=1.0, top_p=0.9,
                                    top_k=50, allowed=allowed, generator=gen)
        else:
            mixed = u + scale * (c - u)
            mixed[:, :v.image_start] = float("-inf")
            tok = mixed.argmax(-1)
        conds = [ids + [t] for ids, t in zip(conds, tok.tolist())]
        unconds = [ids + [t] for ids, t in zip(unconds, tok.tolist())]
    assert [r.samples[0].token_ids for r in results] == [ids[-tpi:] for ids in conds]


def test_three_way_editing_mix_equals_hand_mix(engine):
    v, tpi = engine.vocab, engine.tokens_per_image
    from PIL import Image
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    prompt = [img, "make it blue"]
    params = SamplingParams(temperature=0, cfg_scale=2.0, image_cfg_scale=1.5)
    [r] = engine.generate([prompt], params)
    p = engine.prepare(prompt, params)
    assert p.image_only is not None and v.mask in p.image_only and v.mask not in p.cond
    rows = {"full": p.cond, "img": p.image_only, "none": p.uncond}
    out = []
    for _ in range(tpi):
        lg = {k: _full_logits(engine.model, ids) for k, ids in rows.items()}
        mixed = lg["none"] + 1.5 * (lg["img"] - lg["none"]) + 2.0 * (lg["full"] - lg["img"])
        mixed[:v.image_start] = float("-inf")
        t = int(mixed.argmax())
        out.append(t)
        rows = {k: ids + [t] for k, ids in rows.items()}
    assert r.samples[0].token_ids == out


def test_cd_k_greedy_equals_hand_contrast(engine):
    v = engine.vocab
    params = SamplingParams(temperature=0, cd_k=(0.1, 8))
    [r] = engine.generate(["a red circle"], params)
    cond, uncond = engine.prepare("a red circle", params).cond, [v.bos, v.mask, v.brk]
    for t_engine in r.samples[0].token_ids:
        # CD-K's plausibility cut is taken among the image codes only.
        lp_c = torch.log_softmax(_full_logits(engine.model, cond)[v.image_start:], -1)
        lp_u = torch.log_softmax(_full_logits(engine.model, uncond)[v.image_start:], -1)
        keep = lp_c >= lp_c.topk(8).values[-1] + torch.log(torch.tensor(0.1))
        score = torch.where(keep, lp_c - lp_u, torch.tensor(float("-inf")))
        assert t_engine == v.image_start + int(score.argmax())
        cond, uncond = cond + [t_engine], uncond + [t_engine]


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_cfg_endpoints_reproduce_plain_sampling(engine, alpha):
    """alpha 1 = the conditional rows sampled alone; alpha 0 = the unconditional prompt sampled
    alone; token for token with the same seed (temperature 1, TopP 0.9)."""
    v = engine.vocab
    base = dict(temperature=1.0, top_p=0.9, seed=3, modality="image")
    conds = [engine.prepare(p, SamplingParams()).cond for p in PROMPTS]
    guided = [PreparedPrompt(p, [], c, [v.bos, v.mask, v.brk], None) for p, c in zip(PROMPTS, conds)]
    plain_rows = conds if alpha == 1.0 else [[v.bos, v.mask, v.brk]] * len(PROMPTS)
    plain = [PreparedPrompt(p, [], c, [v.bos, v.mask, v.brk], None) for p, c in zip(PROMPTS, plain_rows)]
    run = lambda prompts, scale: [d.token_ids for d in decode(  # noqa: E731
        engine.model, v, engine.tokens_per_image, prompts, SamplingParams(cfg_scale=scale, **base),
        torch.Generator().manual_seed(3))]
    with_guidance, without = run(guided, alpha), run(plain, 1.0)
    assert with_guidance == without
    assert len({tuple(t) for t in without}) > 1 or alpha == 0.0   # really sampled, not constant
