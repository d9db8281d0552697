"""Train the VQ-VAE image tokenizer on a dataset of images (e.g. ShapesDataset).

MSE reconstruction + 0.25 x commitment loss; the codebook follows the encoder by EMA.
Dead codes (unused for `restart_every` steps) are re-seeded from recent encoder outputs
drawn in proportion to their quantisation error; without restarts only a few dozen of the
512 tiny-preset codes are ever used.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.config import ImageConfig
from engine.stop_request import StopRequests, TrainingStopped
from engine.tokenizer.vq_state import VQTrainingState, load_state, save_state
from engine.tokenizer.vqvae import VQVAE

COMMITMENT = 0.25
RESTART_EVERY = 20          # how often dead codes are looked for
DEAD_AFTER = 100            # steps without a hit before a code counts as dead: rare but
                            # useful codes (a star's tip in one colour) must survive it
RESTART_UNTIL = 0.85        # fraction of training after which the codebook is left to settle
WARMUP_FRACTION = 0.03
POOL_MAX = 20_000           # images rendered up front; batches are drawn from this pool
SAVE_EVERY_S = 600.0        # with a state_path, the state is also saved this often (wall
                            # time), so a crash or a kill without warning loses at most this


def bf16_autocast_helps() -> bool:
    """Whether bf16 autocast pays on this CPU: only with native bf16 dot products.

    torch.backends.cpu.get_cpu_capability() says "AVX512" on an AMD EPYC that does have
    avx512_bf16, so the CPU flags decide. Measured (tiny preset, batch 64, one thread):
    fp32 365 ms/step, bf16 240 ms/step on that EPYC (avx512_bf16, no AMX); AMX machines
    gain more (~2.6x). Without those instructions bf16 is emulated and slower.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _image_pool(dataset, limit: int) -> torch.Tensor:
    """uint8 [N, 3, H, W]: rendering once keeps the training loop free of PIL work."""
    n = min(len(dataset), limit)
    first = np.asarray(_image(dataset[0]).convert("RGB"))
    pool = np.empty((n, *first.shape), dtype=np.uint8)
    pool[0] = first
    for i in range(1, n):
        pool[i] = np.asarray(_image(dataset[i]).convert("RGB"))
    return torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()


def _image(item):
    return item.image if hasattr(item, "image") else item


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, int(steps * WARMUP_FRACTION))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def psnr_db(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def train_vqvae(cfg: ImageConfig, codebook_size: int, dataset, steps: int | None = None,
                seed: int = 0, progress: bool = True, bf16: bool | None = None,
                device: str | torch.device = "cpu", state_path: str | Path | None = None,
                stop: StopRequests | None = None, save_every_s: float = SAVE_EVERY_S) -> VQVAE:
    """Train and return a VQ-VAE in eval mode, on `device`. `bf16=None` picks bf16 autocast
    where the hardware has native bf16 (bf16_autocast_helps on CPU; any bf16 GPU).

    The image pool, the augmentation and every random draw stay on the CPU (one generator),
    so a run's batches do not depend on the device; the batch then moves to it.

    With `state_path` the loop's whole state (engine/tokenizer/vq_state.py) is saved there
    every `save_every_s` seconds and when `stop` (a StopRequests) has a reason, which then
    raises TrainingStopped; a later call with the same path and settings resumes from it and
    ends with the weights an uninterrupted run would have. The caller deletes the file once
    it has kept the result."""
    if stop is not None and state_path is None:
        raise ValueError("stopping the VQ-VAE training on request needs a state_path to save to")
    device = torch.device(device)
    steps = cfg.train_steps if steps is None else steps
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else bf16_autocast_helps()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = _image_pool(dataset, POOL_MAX)
    if pool.shape[-1] != cfg.image_size:
        raise ValueError(f"dataset images are {pool.shape[-1]}px but the config expects "
                         f"{cfg.image_size}px; build the dataset with image_size={cfg.image_size}")
    model = VQVAE(cfg, codebook_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if state_path is not None and Path(state_path).is_file():
        st = load_state(state_path, model, opt, gen, steps, seed, cfg)
    else:
        st = VQTrainingState(last_hit=torch.zeros(codebook_size, dtype=torch.long))
    last_hit, recent_latents, recent_err = st.last_hit, st.recent_latents, st.recent_err
    usage = st.usage
    bar = tqdm(range(st.step, steps), initial=st.step, total=steps, desc="vq-vae",
               disable=not progress, dynamic_ncols=True)
    start = last_save = time.perf_counter()
    for step in bar:
        idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen)
        x = pool[idx].float().div_(255)
        # Mirror half the batch: the shapes are left-right symmetric, so this is free data.
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        # Permute the RGB channels of half the batch (white stays white): the train split
        # never shows a held-out pair such as a red star, and without new hues the codes
        # for a small star's tips exist only in other colours (red stars came back orange).
        perm = torch.rand(cfg.batch_size, generator=gen) < 0.5
        if perm.any():
            order = torch.stack([torch.randperm(3, generator=gen) for _ in range(int(perm.sum()))])
            x[perm] = torch.gather(x[perm], 1, order[:, :, None, None].expand(-1, -1, *x.shape[2:]))
        x = x.to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, cfg.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            recon, codes, commit, flat, err = model(x)
        mse = torch.nn.functional.mse_loss(recon.float(), x)
        loss = mse + COMMITMENT * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        last_hit[codes.flatten().unique().cpu()] = step
        recent_latents.append(flat)
        recent_err.append(err)
        if len(recent_latents) > 4:
            recent_latents.pop(0)
            recent_err.pop(0)
        if (step + 1) % RESTART_EVERY == 0:
            dead = step - last_hit >= DEAD_AFTER
            usage = 1 - dead.float().mean().item()
            if step < RESTART_UNTIL * steps and dead.any():
                model.quantizer.restart(torch.nonzero(dead).flatten(),
                                        torch.cat(recent_latents), torch.cat(recent_err), gen)
                last_hit[dead] = step
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr_db(mse.item()):.1f}",
                            usage=f"{usage:.0%}")
        done = step + 1
        stopping = stop is not None and stop.reason is not None
        if state_path is not None and done < steps and \
                (stopping or time.perf_counter() - last_save >= save_every_s):
            st.step, st.usage = done, usage
            st.seconds += time.perf_counter() - start
            start = last_save = time.perf_counter()
            save_state(state_path, st, model, opt, gen, steps, seed, cfg)
            if stopping:
                bar.close()
                raise TrainingStopped(done, stop.reason, stage="VQ-VAE")
    bar.close()
    model.train_seconds = st.seconds + time.perf_counter() - start
    return model.eval()
