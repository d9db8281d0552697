"""The decode loop: prompts x n samples, CFG branches as extra rows, one cfg_sample per step.

Every sample is a sequence with one to three rows in the RowBatch:
  cond                      always
  uncond                    when guidance is on (cfg_scale != 1, cd_k or the 3-way form)
  image_only                the 3-way (InstructPix2Pix) form, for prompts with an image
Each step gathers all rows' last logits, draws one token per sequence and appends it to all
of that sequence's rows. Inside image spans, guided sequences are sampled from
[cond rows; uncond rows] by engine.ops.cfg_sample (fp32 mix, per-row allowed range); the
3-way form is mixed here in fp32 (none + s_img * (image - none) + s_txt * (full - image)) and
sampled plainly. Everything else (text, forced rows) samples its conditional logits alone.
The sampling calls per step are always made in the same order (plain, then 2-way, then
3-way), so a seed reproduces a run exactly.

Prompts may bring settings of their own (a SamplingParams and a generator each, as the
server's batches do): every forward still covers all rows, and the sampling runs once per
(settings, generator) group, in the order the groups first appear. One SamplingParams and one
generator for the whole call is a single group, drawn exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine import ops
from engine.inference.constraints import SequenceConstraints, text_bans
from engine.inference.params import SamplingParams
from engine.inference.prompts import PreparedPrompt
from engine.inference.row_batch import RowBatch
from engine.model import Transformer
from engine.tokenizer.vocab import Vocab

NEG_INF = float("-inf")


@dataclass
class Decoded:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class _Sequence:
    def __init__(self, prompt_index: int, sample_index: int, rows: dict[str, int],
                 constraints: SequenceConstraints):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.rows, self.c = rows, constraints
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.drawn: tuple[int, float] = (0, 0.0)   # this step's (token, log-probability)


def per_prompt(value, count: int, what: str) -> list:
    """`value` for each of `count` prompts: a list or tuple must have one entry per prompt;
    anything else (one SamplingParams, one generator) is shared by all."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{len(value)} {what} for {count} prompts: pass one for all of "
                             f"them, or one per prompt")
        return list(value)
    return [value] * count


def token_budget(p: PreparedPrompt, params: SamplingParams, tokens_per_image: int,
                 max_seq_len: int) -> int:
    """New tokens a prompt may generate; a clear error when the context cannot hold them."""
    longest = max(len(p.cond), len(p.uncond), len(p.image_only or []))
    room = max_seq_len - longest
    n_images = sum(s.kind == "image" for s in p.spans)
    if p.spans:
        need = n_images * tokens_per_image + len(p.spans)    # codes, and a marker per span
    elif params.modality == "image":
        need = tokens_per_image
    else:
        need = 1
    if params.max_new_tokens is not None and params.max_new_tokens < need:
        raise ValueError(f"max_new_tokens={params.max_new_tokens} cannot hold the output: it needs "
                         f"at least {need} tokens (tokens_per_image={tokens_per_image})")
    budget = need if params.modality == "image" and not p.spans else (params.max_new_tokens or room)
    if longest + budget > max_seq_len:
        raise ValueError(f"the prompt ({longest} tokens) plus {budget} new tokens exceeds the "
                         f"context length max_seq_len={max_seq_len}: shorten the prompt or "
                         f"lower max_new_tokens")
    return budget


def _branches(p: PreparedPrompt, params: SamplingParams, tokens_per_image: int) -> dict[str, list[int]]:
    rows = {"cond": p.cond}
    images_possible = params.modality == "text" or any(s.kind == "image" for s in p.spans) \
        or (params.modality == "image" and not p.spans)
    if params.guided and images_possible:
        rows["uncond"] = p.uncond
        if params.image_cfg_scale is not None and p.image_only is not None:
            rows["image_only"] = p.image_only
    return rows


@torch.no_grad()
def decode(model: Transformer, vocab: Vocab, tokens_per_image: int, prompts: list[PreparedPrompt],
           params: SamplingParams | list[SamplingParams],
           generator: torch.Generator | None | list[torch.Generator | None] = None,
           use_cache: bool = True,
           on_token: Callable[[int, int, int], None] | None = None) -> list[Decoded]:
    """Samples params.n sequences per prompt; returns them prompt-major, sample-minor.
    `params` and `generator` are each one for all prompts or a list with one per prompt.
    `on_token(prompt_index, sample_index, token_id)` hears every token as it is chosen (for
    streaming), forced ones included, in the order each sequence receives them."""
    if not prompts:
        raise ValueError("no prompts given")
    settings = per_prompt(params, len(prompts), "SamplingParams")
    generators = per_prompt(generator, len(prompts), "generators")
    for sp in {id(sp): sp for sp in settings}.values():
        sp.validate()
    budgets = [token_budget(p, sp, tokens_per_image, model.cfg.max_seq_len)
               for p, sp in zip(prompts, settings)]
    rows: list[list[int]] = []
    seqs: list[_Sequence] = []
    # (settings, generator) -> (settings, generator, its sequences): sampled together
    groups: dict[tuple[int, int], tuple[SamplingParams, torch.Generator | None, list]] = {}
    for i, (p, sp, gen, budget) in enumerate(zip(prompts, settings, generators, budgets)):
        group = groups.setdefault((id(sp), id(gen)), (sp, gen, []))
        for j in range(sp.n):
            idx = {}
            for name, ids in _branches(p, sp, tokens_per_image).items():
                idx[name] = len(rows)
                rows.append(ids)
            c = SequenceConstraints(vocab, tokens_per_image, sp.modality, budget, p.spans,
                                    last_prompt_token=p.cond[-1])
            seqs.append(_Sequence(i, j, idx, c))
            group[2].append(seqs[-1])

    was_training = model.training
    model.eval()
    try:
        batch = RowBatch(model, rows, max(budgets), use_cache=use_cache)
        logits = batch.prefill()
        device = logits.device
        bans = {True: text_bans(vocab, allow_sentinels=True).to(device),
                False: text_bans(vocab, allow_sentinels=False).to(device)}
        live = list(seqs)
        while live:
            for sp, gen, members in groups.values():
                mine = [s for s in members if not s.c.done]
                if mine:
                    for s, drawn in zip(mine, _sample_step(mine, logits, sp, bans, gen)):
                        s.drawn = drawn
            step_tokens: dict[int, int] = {}
            finished: set[int] = set()
            for s in live:
                tok, lp = s.drawn
                token, forced = s.c.choose(tok)
                s.c.push(token)
                s.tokens.append(token)
                if on_token is not None:
                    on_token(s.prompt_index, s.sample_index, token)
                s.logprobs.append(0.0 if forced else lp)
                if s.c.done:
                    finished.update(s.rows.values())
                else:
                    step_tokens.update({r: token for r in s.rows.values()})
            live = [s for s in live if not s.c.done]
            batch.drop(finished)
            if live:
                logits = batch.step(step_tokens)
    finally:
        model.train(was_training)
    return [Decoded(s.prompt_index, s.tokens, s.logprobs, s.c.finish_reason) for s in seqs]


def _sample_step(live: list[_Sequence], logits: torch.Tensor, params: SamplingParams,
                 bans: dict[bool, torch.Tensor], generator) -> list[tuple[int, float]]:
    """One token (and its log-probability) per live sequence."""
    device = logits.device
    plain, two_way, three_way = [], [], []
    for j, s in enumerate(live):
        guided = s.c.in_image and s.c.next_forced() is None and "uncond" in s.rows
        if not guided:
            plain.append(j)
        elif "image_only" in s.rows:
            three_way.append(j)
        else:
            two_way.append(j)
    out: list[tuple[int, float]] = [(0, 0.0)] * len(live)
    common = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                  generator=generator)

    def rows(group, name):
        return logits[torch.tensor([live[j].rows[name] for j in group], device=device)]

    def allowed(group):
        return torch.tensor([live[j].c.allowed() for j in group], device=device)

    def record(group, result):
        tokens, lps = result
        for j, t, lp in zip(group, tokens.tolist(), lps.tolist()):
            out[j] = (t, lp)

    if plain:
        x = rows(plain, "cond")
        # Text rows must never draw the ids the allowed interval cannot exclude.
        for is_text_infill in (True, False):
            sel = [k for k, j in enumerate(plain) if not live[j].c.in_image
                   and live[j].c.infilling == is_text_infill]
            if sel:
                sel_t = torch.tensor(sel, device=device)
                x[sel_t] = x[sel_t].masked_fill(bans[is_text_infill], NEG_INF)
        record(plain, ops.cfg_sample(x, cfg_scale=None, allowed=allowed(plain), **common))
    if two_way:
        span = allowed(two_way)
        x = torch.cat([rows(two_way, "cond"), rows(two_way, "uncond")])
        # cfg_sample applies `allowed` after CD-K's plausibility cut, which would keep the k
        # most likely ids of the whole vocabulary, text included, and then find none allowed.
        # CD-K belongs among the image codes, so both rows are restricted first (a no-op for
        # the plain CFG mix, which is elementwise).
        ids = torch.arange(x.shape[1], device=device)
        inside = (ids >= span[:, :1]) & (ids < span[:, 1:])
        x = x.masked_fill(~inside.repeat(2, 1), NEG_INF)
        record(two_way, ops.cfg_sample(x, cfg_scale=params.cfg_scale, cd_k=params.cd_k,
                                       allowed=span, **common))
    if three_way:
        full, img, none = (rows(three_way, n).float() for n in ("cond", "image_only", "uncond"))
        mixed = none + params.image_cfg_scale * (img - none) + params.cfg_scale * (full - img)
        record(three_way, ops.cfg_sample(mixed, cfg_scale=None, allowed=allowed(three_way), **common))
    return out
