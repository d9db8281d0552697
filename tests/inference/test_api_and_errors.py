"""The public API: prompt forms, n samples, re-ranking, results; bad input; the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.inference import Engine, GenerationResult, SamplingParams
from engine.inference.image_generation import SamplingSettings, generate_image_codes
from engine.inference.params import MAX_N


def test_prompt_forms_and_results(engine):
    img = Image.new("RGB", (16, 16), "red")
    results = engine.generate(["a red circle", "a blue square"], SamplingParams(n=2, seed=1))
    assert len(results) == 2 and all(isinstance(r, GenerationResult) for r in results)
    assert all(len(r.samples) == 2 and r.image.size == (16, 16) for r in results)
    s = results[0].samples[0]
    assert len(s.token_ids) == len(s.logprobs) == engine.tokens_per_image
    assert all(lp <= 0 for lp in s.logprobs) and s.finish_reason == "image"
    [mixed] = engine.generate([img, "what colour is the shape?"],
                              SamplingParams(modality="text", max_new_tokens=5, cfg_scale=1.0))
    assert mixed.prompt == "what colour is the shape?" and mixed.prompt_ids[1] >= engine.vocab.image_start
    assert len(engine.generate([["a", img], ["b"]], SamplingParams())) == 2


def test_same_seed_same_samples_and_n_samples_differ(engine):
    p = SamplingParams(n=4, seed=11, temperature=1.0, top_p=1.0)
    a, b = engine.generate("a red circle", p), engine.generate("a red circle", p)
    assert [s.token_ids for s in a[0].samples] == [s.token_ids for s in b[0].samples]
    assert len({tuple(s.token_ids) for s in a[0].samples}) > 1


def test_scorer_reranks_best_first(engine):
    def redness(prompt: str, image: Image.Image) -> float:
        assert prompt == "a red circle"
        return float(np.asarray(image, dtype=np.float32)[..., 0].mean())
    [r] = engine.generate("a red circle", SamplingParams(n=5, seed=2), scorer=redness)
    scores = [s.score for s in r.samples]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1


def test_generate_image_codes_keeps_its_contract(engine):
    captions = [engine.tok.text.encode(c) for c in ("a red circle", "a blue square", "a red circle")]
    gen = torch.Generator().manual_seed(0)
    codes = generate_image_codes(engine.model, engine.vocab, captions, engine.tokens_per_image,
                                 SamplingSettings(cfg_scale=3.0, temperature=0.0), gen)
    assert codes.shape == (3, engine.tokens_per_image)
    assert 0 <= int(codes.min()) and int(codes.max()) < engine.vocab.image_codes
    assert torch.equal(codes[0], codes[2])          # greedy: same caption, same image
    [r] = engine.generate("a red circle", SamplingParams(temperature=0.0, cfg_scale=3.0))
    assert [t - engine.vocab.image_start for t in r.samples[0].token_ids] == codes[0].tolist()


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"), ("   ", "prompt is empty"), ([], "no prompts"),
    ([["a", 3]], "prompt item must be"), ([["", "a"]], "empty text segment"),
])
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, SamplingParams())


@pytest.mark.parametrize("params, message", [
    (SamplingParams(n=0), f"n must be between 1 and {MAX_N}"),
    (SamplingParams(n=MAX_N + 1), f"n must be between 1 and {MAX_N}"),
    (SamplingParams(max_new_tokens=0), "max_new_tokens must be between"),
    (SamplingParams(max_new_tokens=3), "max_new_tokens=3 cannot hold the output"),
    (SamplingParams(top_p=0), "top_p"), (SamplingParams(temperature=-1), "temperature"),
    (SamplingParams(modality="video"), "modality"), (SamplingParams(cd_k=(0, 3)), "cd_k"),
    (SamplingParams(cd_k=(0.1, 3), image_cfg_scale=2.0), "cannot be combined"),
    (SamplingParams(modality="text", max_new_tokens=500), "context length max_seq_len=96"),
])
def test_bad_params(engine, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("a red circle", params)


def test_prompt_plus_image_longer_than_context(engine):
    long = " ".join(["a red circle"] * 40)
    with pytest.raises(ValueError, match="exceeds the context length max_seq_len=96"):
        engine.generate(long, SamplingParams())


def test_images_of_any_mode_and_size_are_fitted(engine, tmp_path):
    for im in (Image.new("L", (40, 24), 128), Image.new("RGBA", (7, 9)), Image.new("P", (16, 16))):
        p = engine.prepare([im, "x"], SamplingParams())
        assert len(p.cond) == 1 + engine.tokens_per_image + 1 + len(engine.tok.text.encode("x")) + 1
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is text")
    with pytest.raises(ValueError, match="not an image file PIL can read"):
        engine.generate([[bad]], SamplingParams())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.generate([[tmp_path / "missing.png"]], SamplingParams())


def test_too_many_mask_spans(engine):
    with pytest.raises(ValueError, match="more than 16 <mask> spans"):
        engine.generate(" ".join(["<mask>"] * 17), SamplingParams(modality="text"))


# -- the CLI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine):
    from engine.checkpoint import save_checkpoint
    from engine.config import get_preset
    root = tmp_path_factory.mktemp("run")
    cfg = get_preset("tiny")
    cfg.image, cfg.model = engine.tok.vq.cfg, engine.model.cfg
    cfg.save(root / "config.json")
    (root / "tokenizer").mkdir()
    engine.tok.text.save(root / "tokenizer" / "bpe.json")
    engine.tok.vq.save(root / "tokenizer" / "vqvae.safetensors")
    save_checkpoint(root, 1, engine.model, torch.optim.SGD(engine.model.parameters(), lr=0.0), {})
    return root


def test_from_run_matches_the_in_memory_engine(run_dir, engine):
    loaded = Engine.from_run(run_dir, device="cpu")
    p = SamplingParams(temperature=0.0)
    assert loaded.generate("a red circle", p)[0].samples[0].token_ids == \
        engine.generate("a red circle", p)[0].samples[0].token_ids


def test_cli_tasks(run_dir, tmp_path, capsys):
    from engine.generate import main
    shape = tmp_path / "shape.png"
    Image.new("RGB", (64, 48), "blue").save(shape)
    out = tmp_path / "grid.png"
    assert main(["--run", str(run_dir), "--prompt", "a red circle", "--n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 256
    assert main(["--run", str(run_dir), "--image", str(shape), "--max-new-tokens", "6"]) == 0
    assert main(["--run", str(run_dir), "--image", str(shape), "--prompt", "what colour is the shape?",
                 "--max-new-tokens", "6", "--n", "2"]) == 0
    edit = tmp_path / "edit.png"
    assert main(["--run", str(run_dir), "--image", str(shape), "--prompt", "make it blue",
                 "--image-cfg", "1.5", "--out", str(edit)]) == 0
    assert Image.open(edit).size == (256, 256)
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("wrote") for line in lines) == 2 and len(lines) == 2 + 1 + 2


@pytest.mark.parametrize("argv, message", [
    (["--prompt", " "], "prompt is empty"),
    (["--prompt", "a", "--n", "0"], "--n must be between"),
    (["--prompt", "a", "--out", "x.jpg"], "must name a .png"),
    (["--prompt", "a"], "needs --out"),
    (["--image", "nope.png", "--prompt", "what?"], "does not exist"),
    (["--prompt", "a <mask>", "--cd-k", "x"], "--cd-k takes ALPHA,K"),
])
def test_cli_errors(run_dir, capsys, argv, message):
    from engine.generate import main
    assert main(["--run", str(run_dir), *argv]) == 2
    assert message in capsys.readouterr().err
