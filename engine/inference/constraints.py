"""Per-sequence modality constraints: which ids may come next, and when generation stops.

The rules (ids are laid out [pad bos eos brk mask | sentinels | BPE | image codes]):
- Inside an image span only image codes may be drawn, exactly tokens_per_image of them; then
  the span closes: the next token is <break> or <eos> (the model picks; [eos, brk] is one
  interval), or generation ends when the request was for one image.
- Outside a span, image codes are never drawn, except that a span may open: in text mode an
  image code is allowed only directly after a <break> (that is how documents put an image
  after text), and only while the token budget can still hold a whole span. Drawing a code
  there opens the span. For modality "image" the prompt ends with <break> and the span is
  forced from the first token.
- Text never draws <pad>, <bos> or <mask>; plain text never draws a CM3 sentinel either.
- Infilling: the sequence walks the prompt's spans in order. A text span ends when the model
  draws a sentinel, <eos> or <break> (spans never cross <break>); that token is replaced by
  the expected marker, <mask:i+1> or finally <eos>. An image span is exactly
  tokens_per_image codes, followed by the forced marker. A text span is ended early (marker
  forced) when the rest of the token budget is what the later image spans need.
Guidance (CFG / CD-K) applies inside image spans only; `in_image` tells the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.inference.prompts import InfillSpan
from engine.tokenizer.vocab import Vocab


def text_bans(vocab: Vocab, allow_sentinels: bool) -> torch.Tensor:
    """Bool [V]: ids text may never draw (the interval `allowed` cannot express holes)."""
    ban = torch.zeros(vocab.size, dtype=torch.bool)
    ban[[vocab.pad, vocab.bos, vocab.mask]] = True
    if not allow_sentinels:
        ban[vocab.sentinel_start:vocab.bpe_start] = True
    return ban


@dataclass
class SequenceConstraints:
    vocab: Vocab
    tokens_per_image: int
    modality: str                       # "image" or "text"
    budget: int                         # max new tokens
    spans: list[InfillSpan] = field(default_factory=list)
    last_prompt_token: int = -1

    def __post_init__(self):
        self.generated = 0
        self.done = False
        self.finish_reason = ""
        self.image_left = 0
        self.closing = False            # an image span just ended: <break> or <eos> next
        self.prev = self.last_prompt_token
        self.forced: list[int] = []
        self.span = 0
        if self.spans:
            self._enter_span()
        elif self.modality == "image":
            self.image_left = self.tokens_per_image

    # -- what may come next ---------------------------------------------------------------
    @property
    def in_image(self) -> bool:
        return self.image_left > 0

    @property
    def infilling(self) -> bool:
        return bool(self.spans)

    def next_forced(self) -> int | None:
        return self.forced[0] if self.forced else None

    def allowed(self) -> tuple[int, int]:
        """[start, end) of the ids that may be drawn now (bans for text come on top)."""
        v = self.vocab
        if self.in_image:
            return v.image_start, v.size
        if self.closing:
            return v.eos, v.brk + 1
        if self.infilling:
            return v.eos, v.image_start
        left = self.budget - self.generated
        if self.prev == v.brk and left >= self.tokens_per_image:
            return v.eos, v.size
        return v.eos, v.image_start

    # -- taking a token -------------------------------------------------------------------
    def choose(self, sampled: int) -> tuple[int, bool]:
        """(the token to append, whether it was forced rather than sampled)."""
        if self.forced:
            return self.forced.pop(0), True
        v = self.vocab
        if self.infilling and not self.in_image:
            if v.is_sentinel(sampled) or sampled in (v.eos, v.brk):
                return self._next_marker(), False
            if self.budget - self.generated <= self._reserved():
                return self._next_marker(), True
        return sampled, False

    def push(self, token: int) -> None:
        """Record an appended token and move the state machine."""
        if self.done:
            raise RuntimeError("push() on a finished sequence")
        v = self.vocab
        self.generated += 1
        self.prev = token
        if self.in_image:
            if not v.is_image(token):
                raise AssertionError(f"token {token} inside an image span is not an image code")
            self.image_left -= 1
            if self.image_left == 0:
                self._close_image()
        elif v.is_image(token):
            self.image_left = self.tokens_per_image - 1
            if self.image_left == 0:
                self._close_image()
        elif self.infilling and v.is_sentinel(token):
            self.span += 1
            self._enter_span()
        elif token == v.eos:
            self._finish("eos")
        else:
            self.closing = False
        if not self.done and self.generated >= self.budget:
            self._finish("length")

    # -- internals --------------------------------------------------------------------------
    def _next_marker(self) -> int:
        nxt = self.span + 1
        return self.spans[nxt].sentinel if nxt < len(self.spans) else self.vocab.eos

    def _reserved(self) -> int:
        """Tokens this span's marker and every later span still need (an image's codes plus
        each span's closing marker), so a long text span is cut short, never an image span."""
        later = self.spans[self.span + 1:]
        return 1 + sum(1 + (self.tokens_per_image if s.kind == "image" else 0) for s in later)

    def _enter_span(self) -> None:
        span = self.spans[self.span]
        self.closing = False
        self.image_left = self.tokens_per_image if span.kind == "image" else 0

    def _close_image(self) -> None:
        if self.infilling:
            self.forced.append(self._next_marker())
        elif self.modality == "image":
            self._finish("image")
        else:
            self.closing = True

    def _finish(self, reason: str) -> None:
        self.done, self.finish_reason = True, reason
        self.forced.clear()
