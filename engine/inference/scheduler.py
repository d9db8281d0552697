"""Continuous batching over a paged KV cache.

Each `step()`:
  1. admits waiting requests (first come, first served; a preempted request goes back to
     the front) while the pool can hold their tokens and `max_running` allows; each is
     registered with the pool, its `n` samples forked from the first so they share every
     prompt block, and identical prefixes of earlier requests are reused (prefix cache);
  2. reserves one slot for every running sample's last token; when the pool is out of
     blocks it preempts the newest running request (frees its blocks; it is recomputed from
     prompt + tokens so far when it is admitted again) instead of failing;
  3. runs the model: each admitted request's uncached prompt tokens alone (prefill), then
     all decoding samples together in one forward of one token each, whatever their
     lengths (ops.paged_decode_attention), so requests join and leave between any two steps;
  4. samples the next token of every sample (greedy unless a `sample` function is given)
     and retires the samples that are done.
The waiting queue is bounded: `submit` raises QueueFull (saying the bound) instead of
growing without limit.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.inference.paged_cache import KVPool
from engine.model import Transformer


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at its bound; retry after some requests finish."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    n: int = 1                       # samples of this prompt, sharing its prompt blocks
    eos: int | None = None
    id: int = -1                     # set by submit()
    outputs: list[list[int]] = field(default_factory=list)   # per sample, generated ids
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return bool(self.outputs) and all(self.sample_done(o) for o in self.outputs)

    def sample_done(self, out: list[int]) -> bool:
        """Whether one sample (its generated ids `out`) has reached its budget or eos."""
        return len(out) >= self.max_new_tokens or (self.eos is not None and bool(out) and out[-1] == self.eos)


Sampler = Callable[[torch.Tensor], torch.Tensor]   # logits [rows, V] fp32 -> token ids [rows]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Scheduler:
    def __init__(self, model: Transformer, pool: KVPool, max_running: int = 64,
                 max_queue: int = 1024, sample: Sampler = greedy):
        self.model, self.pool = model.eval(), pool
        self.max_running, self.max_queue, self.sample = max_running, max_queue, sample
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order: the last is the newest
        self.seqs: dict[int, list[int]] = {}      # request id -> its samples' sequence ids
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.preemptions = 0

    # -- the queue ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the scheduler queue is full ({self.max_queue} waiting requests); "
                            "retry after some finish or raise max_queue")
        if not request.prompt or request.max_new_tokens < 1 or request.n < 1:
            raise ValueError("a request needs a non-empty prompt, max_new_tokens >= 1 and n >= 1")
        longest = len(request.prompt) + request.max_new_tokens
        if longest > self.model.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the context length {self.model.cfg.max_seq_len}")
        need = -(-longest // self.pool.block_size) * request.n
        if need > self.pool.num_blocks:
            raise ValueError(f"the request may need {need} blocks but the pool has {self.pool.num_blocks}")
        request.id = next(self._ids)
        request.outputs = [[] for _ in range(request.n)]
        self.waiting.append(request)
        return request

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> list[Request]:
        """Steps until every submitted request is done; returns them in completion order."""
        done: list[Request] = []
        while not self.idle:
            done += self.step()
        return done

    # -- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        admitted = self._admit()
        decoding = [r for r in self.running if r not in admitted]
        decoding = self._reserve(decoding)
        for r in admitted:
            if r in self.running:
                self._prefill(r)
        if decoding:
            self._decode(decoding)
        finished = [r for r in self.running if r.done]
        for r in finished:
            self._release(r)
            self.running.remove(r)
        return finished

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting[0]
            # A preempted request restarts from prompt + what it had generated (all samples
            # equal only when n == 1; with n > 1 a preempted request restarts its samples).
            tokens = r.prompt + (r.outputs[0] if r.n == 1 else [])
            # Room for the prompt plus one new block per sample, so admission does not at
            # once force a preemption; alone, a request only needs its prompt to fit (submit
            # checked that its whole length fits the pool).
            headroom = r.n if self.running else 0
            if self.pool.manager.blocks_needed(tokens) + headroom > self.pool.manager.num_free_blocks():
                break
            self.waiting.popleft()
            if r.n > 1:
                r.outputs = [[] for _ in range(r.n)]
            ids = [next(self._seq_ids) for _ in range(r.n)]
            self.pool.add(ids[0], tokens)
            for child in ids[1:]:
                self.pool.fork(ids[0], child)
            self.seqs[r.id] = ids
            self.running.append(r)
            admitted.append(r)
        return admitted

    def _reserve(self, decoding: list[Request]) -> list[Request]:
        """A slot for each live sample's last token; preempts the newest requests if needed."""
        ready = []
        for r in decoding:
            if r not in self.running:              # preempted by an earlier request's need
                continue
            for seq, out in zip(self.seqs[r.id], r.outputs):
                if r.sample_done(out) or self.pool.manager.num_tokens(seq) == len(r.prompt) + len(out):
                    continue                        # finished, or slot already reserved
                while self.pool.manager.append_token(seq, out[-1])[0] < 0:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is r:
                        break
                if r not in self.running:
                    break
            else:
                ready.append(r)
        return [r for r in ready if r in self.running]

    def _preempt(self, r: Request) -> None:
        self._release(r)
        self.running.remove(r)
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _release(self, r: Request) -> None:
        for seq in self.seqs.pop(r.id):
            self.pool.free(seq)

    # -- model calls -------------------------------------------------------------------------
    def _prefill(self, r: Request) -> None:
        first = self.seqs[r.id][0]
        view = self.pool.view([first])
        tokens = r.prompt + (r.outputs[0] if r.n == 1 else [])
        ids = torch.tensor([tokens[view.starts[0]:]], device=self.pool.device)
        hidden = self.model(ids, positions=view.positions(), cache=view)[:, -1]
        token = int(self.sample(self.model.logits(hidden))[0])
        # Forks share the prompt's blocks, computed once by the first sample.
        for seq in self.seqs[r.id][1:]:
            self.pool.manager.mark_computed(seq, len(tokens))
        for out in r.outputs:
            out.append(token)

    def _decode(self, decoding: list[Request]) -> None:
        rows = [(r, i) for r in decoding for i, out in enumerate(r.outputs) if not r.sample_done(out)]
        if not rows:
            return
        seqs = [self.seqs[r.id][i] for r, i in rows]
        view = self.pool.view(seqs)
        ids = torch.tensor([[r.outputs[i][-1]] for r, i in rows], device=self.pool.device)
        hidden = self.model(ids, positions=view.positions(), cache=view)[:, -1]
        tokens = self.sample(self.model.logits(hidden)).tolist()
        for (r, i), t in zip(rows, tokens):
            r.outputs[i].append(int(t))
