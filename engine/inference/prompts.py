"""Prompts -> documents -> the id rows a generation runs on (conditional and unconditional).

Accepted prompt forms: a str; a list of str, PIL images, image file paths, engine segments
(TextSegment / ImageSegment) and `MASK` / None (an image-sized hole to infill); a Document.

Layout of the conditional row (the training format of engine.tokenizer.document, open-ended):
  modality "image":  <bos> seg_0 <break> ... seg_n <break>   (the image span follows)
  modality "text":   <bos> seg_0 <break> ... seg_n            (text continues seg_n when it is
                     text, e.g. a question's answer; after an image a <break> is added so the
                     text starts a new segment, e.g. a caption)
Unconditional rows (CFG): the whole prompt replaced by one <mask>, "<bos> <mask> <break>",
the form condition dropout trains. The 3-way editing form adds an "image only" row: every
text segment replaced by <mask>, the images kept.

Infilling: "<mask>" inside a text segment, or a MASK/None image segment, is a span to fill
(a text span includes the space before it: "a <mask> circle" fills as "a" + " red" + " circle").
Span i becomes <mask:i> in place; the prompt then ends with "<mask:0>" and the model writes
span 0, then <mask:1> (forced if the model does not write it), ... (engine.data.cm3's layout).

Images: any PIL mode is converted to RGB; a non-square image is centre-cropped to its largest
square; the square is resized to the tokenizer's image_size with bicubic filtering.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from PIL import Image, UnidentifiedImageError

from engine.tokenizer.document import Document, DocumentTokenizer, ImageSegment, TextSegment

MASK_TEXT = "<mask>"


class _ImageHole:
    """The marker for an image-sized span to infill (MASK in a prompt list)."""

    def __repr__(self) -> str:
        return "MASK"


MASK = _ImageHole()
PromptItem = Union[str, Path, Image.Image, TextSegment, ImageSegment, None, _ImageHole]
Prompt = Union[str, Sequence[PromptItem]]


@dataclass
class InfillSpan:
    kind: str        # "text" or "image"
    sentinel: int    # the <mask:i> id that marks it


@dataclass
class PreparedPrompt:
    """Everything the decoder needs for one prompt."""
    text: str                        # the prompt's text, for display and the scorer
    document: Document
    cond: list[int]
    uncond: list[int]                # the 2-way unconditional row (also 3-way "none")
    image_only: list[int] | None     # the 3-way middle row; None without an image in the prompt
    spans: list[InfillSpan] = field(default_factory=list)


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return read_image(path, str(path))


def read_image(source, name: str) -> Image.Image:
    """The image in `source` (a path or a binary file object), decoded in full; `name` says
    which input it was when PIL cannot read it."""
    try:
        with Image.open(source) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not an image file PIL can read (use PNG, JPEG, BMP, GIF, "
                         "WebP or TIFF)") from None


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """The documented rule: RGB, centre-crop to the largest square, bicubic resize to size."""
    if image.width < 1 or image.height < 1:
        raise ValueError("an image in the prompt has no pixels")
    image = image.convert("RGB")
    side = min(image.size)
    if image.width != image.height:
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def to_document(prompt: Prompt | Document) -> Document:
    if isinstance(prompt, (str, Image.Image, Path, TextSegment, ImageSegment)):
        prompt = [prompt]
    doc: Document = []
    for item in prompt:
        if isinstance(item, str):
            doc.append(TextSegment(item))
        elif isinstance(item, (TextSegment, ImageSegment)):
            doc.append(item)
        elif isinstance(item, Path):
            doc.append(ImageSegment(image=load_image(item)))
        elif isinstance(item, Image.Image):
            doc.append(ImageSegment(image=item))
        elif item is None or item is MASK:
            doc.append(ImageSegment())
        else:
            raise ValueError(f"a prompt item must be a str, a PIL image, an image path, a "
                             f"segment or MASK; got {type(item).__name__}")
    if not doc or all(isinstance(s, TextSegment) and not s.text.strip() for s in doc):
        raise ValueError("the prompt is empty: give some text and/or an image")
    for s in doc:
        if isinstance(s, TextSegment) and not s.text:
            raise ValueError("a prompt contains an empty text segment; drop it or write some text")
    return doc


def _is_hole(seg) -> bool:
    return isinstance(seg, ImageSegment) and seg.codes is None and seg.image is None


def prepare(prompt: Prompt | Document, tok: DocumentTokenizer, modality: str,
            image_size: int) -> PreparedPrompt:
    """Tokenises one prompt into its conditional, unconditional and 3-way rows."""
    v = tok.vocab
    doc = to_document(prompt)
    doc = [ImageSegment(image=fit_image(s.image, image_size))
           if isinstance(s, ImageSegment) and s.codes is None and s.image is not None else s
           for s in doc]
    spans: list[InfillSpan] = []

    def sentinel(kind: str) -> int:
        if len(spans) == v.num_sentinels:
            raise ValueError(f"the prompt has more than {v.num_sentinels} <mask> spans "
                             f"(vocab.num_sentinels); fill it in several calls")
        spans.append(InfillSpan(kind, v.sentinel(len(spans))))
        return spans[-1].sentinel

    segments: list[list[int]] = []
    for seg in doc:
        if _is_hole(seg):
            segments.append([sentinel("image")])
        elif isinstance(seg, TextSegment):
            ids: list[int] = []
            pieces = re.split(re.escape(MASK_TEXT), seg.text)
            for j, piece in enumerate(pieces):
                if j:
                    ids.append(sentinel("text"))
                if j < len(pieces) - 1 and piece.endswith(" "):
                    # "a <mask> circle": the span takes the space before it, as CM3 cut its
                    # spans in training (BPE words carry their leading space: " red"), so the
                    # model never reads a lone space before a sentinel and the filled text has
                    # one space, not two.
                    piece = piece[:-1]
                ids += tok.text.encode(piece) if piece else []
            segments.append(ids)
        else:
            segments.append(tok.segment_ids(seg))

    def join(segs: list[list[int]]) -> list[int]:
        out = [v.bos]
        for i, s in enumerate(segs):
            out += ([v.brk] if i else []) + s
        return out

    has_image = any(isinstance(s, ImageSegment) and not _is_hole(s) for s in doc)
    if spans:
        # Infilling continues after the body exactly as CM3 training laid it out.
        cond = join(segments) + [spans[0].sentinel]
    elif modality == "image" or isinstance(doc[-1], ImageSegment):
        cond = join(segments) + [v.brk]
    else:
        cond = join(segments)
    uncond = [v.bos, v.mask, v.brk]
    image_only = None
    if has_image and not spans:
        masked = [s if isinstance(seg, ImageSegment) else [v.mask] for s, seg in zip(segments, doc)]
        image_only = join(masked) + cond[len(join(segments)):]
    text = " ".join(s.text for s in doc if isinstance(s, TextSegment))
    return PreparedPrompt(text, doc, cond, uncond, image_only, spans)
