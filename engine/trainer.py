"""The model training loop: AdamW, warmup + cosine, clipping, bf16 autocast, an EMA of the
weights, checkpoints.

Progress shows loss, tokens/s and the ETA; every `log_every` steps a line goes to
metrics.jsonl; every `eval_every` steps (and at the end) the validation sets' losses join that
line (engine/validation.py); every `checkpoint_every` steps (and at the end) a checkpoint is
written atomically. Ctrl-C or SIGTERM stops the loop at the end of its step with a checkpoint there
(engine/stop_request.py), so `--resume` loses nothing. Resuming restores model, optimizer and
step; the data stream is reseeded from (seed, step) so a resumed run sees fresh documents
rather than a replay. With `ema_decay` > 0 the model leaves training holding the EMA weights,
the ones inference uses.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine.checkpoint import (latest_checkpoint, list_checkpoints, load_average, load_model_weights,
                               load_optimizer, save_checkpoint)
from engine.config import TrainConfig
from engine.data.cm3 import images_after_caption_spans
from engine.data.packing import Packer
from engine.distributed import DataParallel
from engine.model import Transformer
from engine.stop_request import StopRequests, TrainingStopped
from engine.validation import loss as validation_loss
from engine.weight_average import WeightAverage


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on embeddings and norms (GPT-2/OPT practice): decay only matrices.
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def bf16_autocast_ok(device: torch.device) -> bool:
    """bf16 autocast only where the hardware has bf16 arithmetic (else it is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class _LossStep(torch.nn.Module):
    """The model and its loss as one module, so that DDP sees the whole step."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, cu_seqlens, targets):
        return self.model.loss(self.model(ids, positions=positions, cu_seqlens=cu_seqlens),
                               targets)


def train_model(model: Transformer, stream_factory, vocab, cfg: TrainConfig, run_dir: Path,
                device: torch.device, resume: bool, progress: bool = True,
                context_only=None, dp: DataParallel = DataParallel(),
                validation: dict[str, list] | None = None) -> list[dict]:
    """stream_factory(seed) -> iterator of token lists. Returns the metrics records.
    context_only(doc) -> [start, end) ranges trained as context only (engine.data.packing);
    by default the CM3 rule cfg.image_loss_after_caption_span sets. `dp`: this process's
    place among data-parallel processes (engine/distributed.py). `validation`: set name ->
    its packed batches (engine.validation.batches), measured by the first process."""
    dp.check_batch(cfg.batch_size)
    model.to(device).train()
    model.activation_checkpointing = cfg.activation_checkpointing
    step_fn = _LossStep(model)
    if dp.active:
        # gradients as views into DDP's reduction buckets: one copy of them, not two
        step_fn = DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    optim = make_optimizer(model, cfg)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if resume and list_checkpoints(run_dir):
        ckpt = latest_checkpoint(run_dir)
        state = load_model_weights(ckpt, model)
        load_optimizer(ckpt, optim, state)
        if average is not None:
            load_average(ckpt, average, state)
        start = state["step"]
    if start >= cfg.steps:
        if average is not None:
            average.copy_to(model)
        return _read_metrics(run_dir)
    if dp.main:
        _truncate_metrics(run_dir, start)   # drop lines logged after the resumed checkpoint
    if context_only is None and not cfg.image_loss_after_caption_span:
        context_only = functools.partial(images_after_caption_spans, vocab=vocab)
    packer = Packer(stream_factory(cfg.seed * 1_000_003 + start), vocab, model.cfg.max_seq_len,
                    row_len=cfg.row_tokens or None, context_only=context_only)
    use_bf16 = cfg.autocast_bf16 and bf16_autocast_ok(device)
    metrics_f = open(Path(run_dir) / "metrics.jsonl", "a") if dp.main else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (progress and dp.main), dynamic_ncols=True)
    tokens_seen, t0, loss_acc, n_acc = 0, time.time(), 0.0, 0

    def log_metrics(done, lr, gnorm, rate, measured):
        nonlocal loss_acc, n_acc
        rec = {"step": done, "loss": loss_acc / n_acc, "lr": lr, "grad_norm": float(gnorm),
               "tokens_per_s": rate, "time": time.time(), **measured}
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        loss_acc, n_acc = 0.0, 0

    try:
        with StopRequests() as stop:
            for step in bar:
                batch = packer.next_batch(cfg.batch_size)
                lr = lr_at(step, cfg)
                for g in optim.param_groups:
                    g["lr"] = lr
                loss = _forward_backward(step_fn, batch, cfg, device, use_bf16, step, dp)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optim.step()
                optim.zero_grad(set_to_none=True)
                if average is not None:
                    average.update()
                tokens_seen += batch.ids.numel()
                loss_acc += loss.item()
                n_acc += 1
                rate = tokens_seen / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.1e}")
                done = step + 1
                stopping = dp.any(stop.reason is not None, device)  # all stop together
                validating = bool(validation) and cfg.eval_every > 0 and dp.main and (
                    done % cfg.eval_every == 0 or done == cfg.steps)
                measured = {}
                if validating:
                    started = time.time()
                    measured = {f"{name}_loss": validation_loss(model, batches, device, use_bf16)
                                for name, batches in validation.items()}
                    if average is not None:   # the weights inference will use, too
                        with average.applied(model):
                            measured.update({
                                f"{name}_ema_loss": validation_loss(model, batches, device,
                                                                    use_bf16)
                                for name, batches in validation.items()})
                    t0 += time.time() - started  # tokens/s counts training time only
                if dp.main and (done % cfg.log_every == 0 or done == cfg.steps or stopping
                                or validating):
                    log_metrics(done, lr, gnorm, rate, measured)
                if dp.main and (done % cfg.checkpoint_every == 0 or done == cfg.steps
                                or stopping):
                    save_checkpoint(run_dir, done, model, optim, {"tokens_per_s": rate},
                                    average=average)
                if stopping and done < cfg.steps:
                    dp.barrier()  # the checkpoint is written before any process leaves
                    raise TrainingStopped(done, stop.reason or "SIGTERM")
        if average is not None:
            average.copy_to(model)
    finally:
        if metrics_f is not None:
            metrics_f.close()
        bar.close()
    dp.barrier()
    return _read_metrics(run_dir)


def _forward_backward(step_fn, batch, cfg: TrainConfig, device, use_bf16: bool, step: int,
                      dp: DataParallel = DataParallel()):
    """The batch's loss (mean over its targets), its gradients accumulated into the model's.

    Under data parallelism this process takes its slice of the rows; with
    cfg.micro_batch_size, the slice runs in parts of that many rows. Each part's mean loss is
    weighted by its share of the whole batch's targets (times the process count, which DDP's
    gradient average divides out), so the gradient is the whole batch's mean's, whatever the
    split. Returns the whole batch's mean loss (summed over processes)."""
    total = max(batch.num_targets, 1)
    if dp.active:
        batch = batch.rows(*dp.rows(batch.ids.shape[0]))
    rows = batch.ids.shape[0]
    micro = cfg.micro_batch_size or rows
    parts = [batch] if micro >= rows else [batch.rows(r, min(r + micro, rows))
                                           for r in range(0, rows, micro)]
    loss_sum = None
    for i, part in enumerate(parts):
        weight = part.num_targets / total * dp.world  # exactly 1 for a whole batch
        part = part.to(device)
        # DDP reduces gradients once per step: on the last part's backward
        last = i == len(parts) - 1
        sync = step_fn.no_sync() if dp.active and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = step_fn(part.ids, part.positions, part.cu_seqlens, part.targets)
            (loss * weight).backward()
        share = loss.detach() * (weight / dp.world)
        loss_sum = share if loss_sum is None else loss_sum + share
    loss_sum = dp.sum(loss_sum)
    if not torch.isfinite(loss_sum):  # before the optimizer step: no update is applied
        raise FloatingPointError(f"loss is {loss_sum.item()} at step {step}: lower --lr "
                                 "or resume from the last checkpoint")
    return loss_sum


def _truncate_metrics(run_dir: Path, step: int) -> None:
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        keep = [r for r in _read_metrics(run_dir) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


def _read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
