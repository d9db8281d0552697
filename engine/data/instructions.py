"""Instruction-tuning (SFT) documents: CM3Leon's four task kinds over the shapes data, with
the loss on the output only.

Each document is laid out exactly as generation lays out its prompt
(engine.inference.prompts.prepare), then the output and <eos>:

  task           prompt (context: read, never a target)      output (trained)
  text_to_image  <bos> caption <break>                         image <eos>
  caption        <bos> image <break>                           caption <eos>
  vqa            <bos> image <break> question                  answer <eos>
  edit           <bos> image <break> instruction <break>       edited image <eos>

The answer continues the question's text segment (" purple" after "what colour is the
shape?"), as generated text continues a prompt that ends in text. Questions about colour,
shape and place use one-shape pictures, so every answer is unambiguous; "how many shapes are
there?" also uses pairs. An edit redraws the same picture with a new colour or a new shape
in the same place and size, and never makes a held-out (colour, shape) pair, so the held-out
evaluation stays unseen.

CFG condition dropout (train.cfg_dropout) for image outputs: the prompt becomes
<bos> <mask> <break> (the unconditional row of CFG sampling); for an edit, with the same
probability again, only the instruction becomes <mask> (the 3-way form's image-only row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from engine.config import SFT_TASKS, SFTConfig
from engine.data.corpus import encode_corpus
from engine.data.shapes import COLOURS, HELD_OUT, SHAPES, ShapeExample, draw_shapes
from engine.tokenizer.vocab import Vocab

COUNT_QUESTION = "how many shapes are there?"
COUNT_WORDS = {1: "one", 2: "two"}


class InstructionDocument(list):
    """Token ids whose first `prompt_len` are context: read, never trained as targets."""

    def __init__(self, ids: list[int], prompt_len: int):
        super().__init__(ids)
        self.prompt_len = prompt_len


def prompt_context(doc: InstructionDocument) -> list[tuple[int, int]]:
    """The Packer's `context_only` rule for instruction documents: the prompt."""
    return [(0, doc.prompt_len)]


def questions(example: ShapeExample) -> list[tuple[str, str]]:
    """The (question, answer) pairs a picture answers unambiguously."""
    pairs = [(COUNT_QUESTION, COUNT_WORDS[len(example.objects)])]
    if len(example.objects) == 1:
        colour, shape, position = example.objects[0]
        pairs += [("what colour is the shape?", colour), ("what shape is it?", shape),
                  (f"where is the {shape}?", position)]
    return pairs


def edit_for(example: ShapeExample, rng: np.random.Generator) -> tuple[str, ShapeExample] | None:
    """An instruction and the picture it asks for (a one-shape picture redrawn with a new
    colour or a new shape, never a held-out pair); None for a picture of two shapes."""
    if len(example.drawn) != 1:
        return None
    colour, shape, cx, cy, r = example.drawn[0]
    position = example.objects[0][2]
    if rng.random() < 0.5:
        options = [c for c in COLOURS if c != colour and (c, shape) not in HELD_OUT]
        colour = options[rng.integers(len(options))]
        instruction = f"make it {colour}"
    else:
        options = [s for s in SHAPES if s != shape and (colour, s) not in HELD_OUT]
        shape = options[rng.integers(len(options))]
        instruction = f"make it a {shape}"
    image = draw_shapes([(colour, shape, cx, cy, r)], example.image.width)
    edited = ShapeExample(image=image, caption=f"a {colour} {shape}",
                          objects=((colour, shape, position),), drawn=((colour, shape, cx, cy, r),))
    return instruction, edited


@dataclass
class InstructionSet:
    """Pictures with their captions and VQ codes, and one edit per one-shape picture: what
    the instruction stream draws from."""
    examples: list[ShapeExample]
    captions: list[list[int]]            # BPE ids
    codes: torch.Tensor                  # [N, tokens_per_image]
    edits: dict[int, tuple[str, torch.Tensor]]   # example index -> (instruction, edited codes)

    @property
    def single(self) -> list[int]:
        return sorted(self.edits)


def build_instruction_set(dataset, text, vq, seed: int, progress: bool = True) -> InstructionSet:
    """Every picture of `dataset` and its edit through the BPE and the VQ-VAE encoder."""
    rng = np.random.default_rng(seed)
    examples = [dataset[i] for i in range(len(dataset))]
    edits = {i: e for i, e in ((i, edit_for(x, rng)) for i, x in enumerate(examples)) if e}
    encoded = encode_corpus(examples + [edited for _, edited in edits.values()], text, vq,
                            progress=progress)
    n = len(examples)
    edited = {i: (e[0], encoded.codes[n + j]) for j, (i, e) in enumerate(edits.items())}
    return InstructionSet(examples, encoded.captions[:n], encoded.codes[:n], edited)


def _image(codes, vocab: Vocab) -> list[int]:
    return [vocab.image_token(int(c)) for c in codes]


def instruction_document(task: str, data: InstructionSet, i: int, text, vocab: Vocab,
                         cfg_dropout: float, rng: np.random.Generator) -> InstructionDocument:
    """Example i as a `task` document (the table in the module docstring)."""
    image = _image(data.codes[i], vocab)
    dropped = [vocab.bos, vocab.mask, vocab.brk]
    if task == "text_to_image":
        prompt = [vocab.bos, *data.captions[i], vocab.brk]
        if rng.random() < cfg_dropout:
            prompt = dropped
        output = image
    elif task == "caption":
        prompt, output = [vocab.bos, *image, vocab.brk], list(data.captions[i])
    elif task == "vqa":
        pairs = questions(data.examples[i])
        question, answer = pairs[rng.integers(len(pairs))]
        prompt = [vocab.bos, *image, vocab.brk, *text.encode(question)]
        output = text.encode(" " + answer)
    elif task == "edit":
        instruction, edited = data.edits[i]
        prompt = [vocab.bos, *image, vocab.brk, *text.encode(instruction), vocab.brk]
        u = rng.random()
        if u < cfg_dropout:
            prompt = dropped
        elif u < 2 * cfg_dropout:
            prompt = [vocab.bos, *image, vocab.brk, vocab.mask, vocab.brk]
        output = _image(edited, vocab)
    else:
        raise ValueError(f"unknown SFT task {task!r}; choose one of: {', '.join(SFT_TASKS)}")
    return InstructionDocument(prompt + output + [vocab.eos], len(prompt))


def instruction_stream(data: InstructionSet, text, vocab: Vocab, sft: SFTConfig,
                       cfg_dropout: float, seed: int) -> Iterator[InstructionDocument]:
    """Endless instruction documents, tasks drawn in the shares sft gives them."""
    rng = np.random.default_rng(seed)
    shares = np.array([getattr(sft, t) for t in SFT_TASKS], dtype=np.float64)
    single = data.single
    if not single and (sft.vqa > 0 or sft.edit > 0):
        raise ValueError("the instruction set has no one-shape picture to ask about or edit: "
                         "raise sft.examples")
    while True:
        task = SFT_TASKS[rng.choice(len(SFT_TASKS), p=shares / shares.sum())]
        pool = single if task == "edit" or (task == "vqa" and rng.random() < 0.9) else None
        i = pool[rng.integers(len(pool))] if pool else int(rng.integers(len(data.examples)))
        yield instruction_document(task, data, i, text, vocab, cfg_dropout, rng)
