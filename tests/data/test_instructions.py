"""Instruction-tuning documents (engine/data/instructions.py): each prompt is the row
generation builds for the same request, the output and <eos> are the only targets, edits
redraw the picture and never make a held-out pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest_runs import make_untrained_run
from engine.config import SFT_TASKS, SFTConfig
from engine.data.instructions import (COUNT_QUESTION, build_instruction_set, edit_for,
                                      instruction_document, instruction_stream, prompt_context,
                                      questions)
from engine.data.packing import IGNORE, Packer
from engine.data.shapes import HELD_OUT, ShapesDataset, draw_shapes
from engine.inference.prompts import prepare
from engine.run_artifacts import RunDir
from engine.tokenizer.bpe import TextTokenizer
from engine.tokenizer.document import DocumentTokenizer
from engine.tokenizer.vocab import Vocab
from engine.tokenizer.vqvae import VQVAE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg, run = make_untrained_run(tmp_path_factory.mktemp("runs") / "src")
    vocab = Vocab.from_config(cfg.vocab)
    text = TextTokenizer.load(run.bpe, vocab)
    vq = VQVAE.load(RunDir(run.root).vqvae, cfg.image, cfg.vocab.image_codes).eval()
    tok = DocumentTokenizer(vocab, text, vq, cfg.image.tokens_per_image)
    pictures = ShapesDataset("train", cfg.image.image_size, size=60, seed=3)
    data = build_instruction_set(pictures, text, vq, seed=0, progress=False)
    return cfg, vocab, text, tok, data


def test_prompts_are_the_rows_generation_builds(setup):
    cfg, vocab, text, tok, data = setup
    rng = np.random.default_rng(0)
    i = data.single[0]
    x = data.examples[i]
    instruction = data.edits[i][0]
    size = cfg.image.image_size
    requests = {"text_to_image": ([x.caption], "image"), "caption": ([x.image], "text"),
                "edit": ([x.image, instruction], "image")}
    for task, (prompt, modality) in requests.items():
        doc = instruction_document(task, data, i, text, vocab, 0.0, rng)
        assert doc[:doc.prompt_len] == prepare(prompt, tok, modality, size).cond, task
    for question, answer in questions(x):
        doc = instruction_document("vqa", data, i, text, vocab, 0.0, _rng_for(question, x))
        assert doc[:doc.prompt_len] == prepare([x.image, question], tok, "text", size).cond
        assert text.decode(doc[doc.prompt_len:-1]) == " " + answer
        assert doc[-1] == vocab.eos


def _rng_for(question, example):
    """An rng whose first draw picks `question` among the picture's questions."""
    pairs = questions(example)
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        if pairs[np.random.default_rng(seed).integers(len(pairs))][0] == question:
            return rng
    raise AssertionError(question)


def test_dropped_conditions_are_the_cfg_rows(setup):
    cfg, vocab, text, tok, data = setup
    i = data.single[1]
    x = data.examples[i]
    prepared = prepare([x.image, data.edits[i][0]], tok, "image", cfg.image.image_size)
    forms = set()
    for seed in range(200):
        doc = instruction_document("edit", data, i, text, vocab, 0.3, np.random.default_rng(seed))
        forms.add(tuple(doc[:doc.prompt_len]))
    assert forms == {tuple(prepared.cond), tuple(prepared.uncond), tuple(prepared.image_only)}


def test_edits_redraw_the_picture_and_skip_held_out_pairs(setup):
    cfg, vocab, text, tok, data = setup
    rng = np.random.default_rng(0)
    pictures = ShapesDataset("train", cfg.image.image_size, size=300, seed=5)
    kinds = set()
    for k in range(len(pictures)):
        x = pictures[k]
        edit = edit_for(x, rng)
        if len(x.objects) == 2:
            assert edit is None
            continue
        instruction, y = edit
        (c0, s0, *geometry), = x.drawn
        (c1, s1, *geometry1), = y.drawn
        assert geometry == geometry1 and (c0, s0) != (c1, s1) and (c1, s1) not in HELD_OUT
        assert instruction == (f"make it {c1}" if s1 == s0 else f"make it a {s1}")
        kinds.add("colour" if s1 == s0 else "shape")
        assert np.array_equal(np.asarray(y.image), np.asarray(draw_shapes(list(y.drawn), 32)))
    assert kinds == {"colour", "shape"}
    i = data.single[2]
    doc = instruction_document("edit", data, i, text, vocab, 0.0, rng)
    codes = [t - vocab.image_start for t in doc[doc.prompt_len:-1]]
    assert codes == data.edits[i][1].tolist()


def test_only_outputs_are_targets(setup):
    cfg, vocab, text, tok, data = setup
    docs = [d for d, _ in zip(instruction_stream(data, text, vocab, SFTConfig(), 0.1, seed=0),
                              range(40)) if len(d) <= 160]
    batch = Packer(iter(docs), vocab, 160, context_only=prompt_context).next_batch(4)
    ids, targets = batch.ids.flatten(), batch.targets.flatten()
    starts = batch.cu_seqlens.tolist()
    checked = 0
    for a, b in zip(starts[:-1], starts[1:]):
        if (ids[a:b] == vocab.pad).all():          # a row's padding tail
            continue
        doc = docs[checked]
        assert ids[a:b].tolist() == list(doc)
        # Position j predicts token j + 1: no prompt token is a target, every output token
        # and the <eos> is, and the last position (no next token) is not.
        assert (targets[a:a + doc.prompt_len - 1] == IGNORE).all()
        assert targets[a + doc.prompt_len - 1:b - 1].tolist() == list(doc[doc.prompt_len:])
        assert targets[b - 1] == IGNORE
        checked += 1
    assert checked >= 4


def test_stream_follows_the_task_shares(setup):
    cfg, vocab, text, tok, data = setup
    only_questions = SFTConfig(text_to_image=0, caption=0, vqa=1, edit=0)
    for doc, _ in zip(instruction_stream(data, text, vocab, only_questions, 0.1, seed=1), range(30)):
        answer = text.decode(doc[doc.prompt_len:-1]).strip()
        assert answer and not any(vocab.is_image(t) for t in doc[doc.prompt_len:])
    assert questions(data.examples[data.single[0]])[0][0] == COUNT_QUESTION
    with pytest.raises(ValueError, match="unknown SFT task"):
        instruction_document("poetry", data, 0, text, vocab, 0.0, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(vqa=-1), "shares must be >= 0"),
    (dict(text_to_image=0, caption=0, vqa=0, edit=0), "positive sum"),
    (dict(examples=0), "sft.examples"),
])
def test_sft_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**kwargs)


def test_tasks_cover_the_paper(setup):
    assert SFT_TASKS == ("text_to_image", "caption", "vqa", "edit")
    assert torch.is_tensor(setup[4].codes)
