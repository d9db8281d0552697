"""The generation engine on a GPU: the same random engines as the CPU tests, moved to CUDA.

Every other inference test runs on CPU, where the ops take their C++ or reference backends;
on CUDA the paged decode, the KV-cache write, CFG sampling and the prefill attention take
their CUDA / Triton backends instead. Greedy tokens on the GPU must equal the CPU's (fp32;
the fixtures' sharp output layer keeps greedy near-ties rare) and, on the GPU, the paged
cache's must equal full recomputation's. Sampled images must come back as pictures, and the
same seed must give the same samples."""
from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from engine.inference import MASK, SamplingParams
from tests.inference.conftest import build_engine

pytestmark = pytest.mark.cuda

PICTURE = Image.new("RGB", (16, 16), (200, 30, 30))
CASES = {
    "image_cfg_n2": (["a red circle", "a blue square on the left"], dict(n=2, cfg_scale=3.0)),
    "text": (["a small green triangle", "make it blue"], dict(modality="text", max_new_tokens=12)),
    "infill": ([["a <mask> circle", MASK]], dict(modality="text", max_new_tokens=24)),
    "caption": ([[PICTURE]], dict(modality="text", max_new_tokens=12)),
}


def on(engine, device):
    """The engine with its model on `device`; the VQ-VAE stays where Engine.from_run keeps it
    (CPU), so image prompts and pictures cross between the two devices as they do there."""
    moved = copy.deepcopy(engine)
    moved.model.to(device)
    return moved


def tokens(results):
    return [[s.token_ids for s in r.samples] for r in results]


@pytest.fixture(scope="module", params=[dict(), dict(n_kv_heads=2, seed=1)], ids=["mha", "gqa"])
def engines(request):
    cpu = build_engine(**request.param)
    return cpu, on(cpu, "cuda")


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_on_the_gpu_equals_the_cpu(engines, case):
    cpu, gpu = engines
    prompts, kw = CASES[case]
    params = SamplingParams(temperature=0.0, **kw)
    want = tokens(cpu.generate(prompts, params))
    assert tokens(gpu.generate(prompts, params)) == want and all(ids for r in want for ids in r)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_paged_cache_equals_full_recompute(engines, case):
    _, gpu = engines
    prompts, kw = CASES[case]
    params = SamplingParams(temperature=0.0, **kw)
    assert tokens(gpu.generate(prompts, params)) == tokens(gpu.generate(prompts, params,
                                                                        use_cache=False))


def test_gpu_samples_are_pictures_and_repeat_with_the_seed(engines):
    _, gpu = engines
    params = SamplingParams(n=3, cfg_scale=3.0, top_p=0.9, seed=7)
    first = gpu.generate(["a red circle", "a small green triangle"], params)
    again = gpu.generate(["a red circle", "a small green triangle"], params)
    assert tokens(first) == tokens(again)
    for r in first:
        for s in r.samples:
            assert len(s.images) == 1 and s.images[0].size == (16, 16)
            assert all(gpu.vocab.is_image(t) for t in s.token_ids[:16])


def test_gpu_engine_in_bfloat16(engines):
    # bf16 weights and KV cache (Engine.from_run(..., dtype="bfloat16")): the paged kernels'
    # bf16 paths inside the engine; pictures come back whole and the seed repeats them
    _, gpu = engines
    half = copy.deepcopy(gpu)
    half.model.to(torch.bfloat16)
    params = SamplingParams(n=2, cfg_scale=3.0, seed=3)
    first = half.generate(["a red circle", "make it blue"], params)
    assert tokens(first) == tokens(half.generate(["a red circle", "make it blue"], params))
    assert all(len(s.images) == 1 for r in first for s in r.samples)
    text = half.generate([[PICTURE]], SamplingParams(temperature=0.0, modality="text",
                                                     max_new_tokens=12))
    assert text[0].samples[0].token_ids
