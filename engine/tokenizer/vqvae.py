"""The VQ-VAE image tokenizer: image <-> grid*grid discrete codes (raster order).

Conv encoder (downsample by cfg.downsample with stride-2 convs) -> vector quantiser with an
EMA-updated codebook -> conv decoder. EMA updates (van den Oord et al. 2017, appendix;
Razavi et al. 2019) converge faster than a gradient-trained codebook at this size, and the
trainer (vq_train.py) restarts dead codes from recent encoder outputs so that the whole
codebook stays in use.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.config import ImageConfig


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.body(x)


def _levels(downsample: int) -> int:
    n = int(math.log2(downsample))
    if downsample < 1 or 2 ** n != downsample:
        raise ValueError(f"downsample={downsample} must be a power of two")
    return n


class Encoder(nn.Module):
    def __init__(self, ch: int, code_dim: int, downsample: int):
        super().__init__()
        n = _levels(downsample)
        # Full-resolution layers are the expensive ones: keep them narrow (ch/2) and widen
        # after the first stride-2 step.
        widths = [max(ch // 2, 8)] + [ch] * n
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i in range(n):
            layers += [nn.SiLU(), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]
        layers += [ResBlock(ch), ResBlock(ch), nn.SiLU(), nn.Conv2d(ch, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, ch: int, code_dim: int, downsample: int):
        super().__init__()
        n = _levels(downsample)
        widths = [ch] * n + [max(ch // 2, 8)]
        layers: list[nn.Module] = [nn.Conv2d(code_dim, ch, 3, padding=1), ResBlock(ch), ResBlock(ch)]
        for i in range(n):
            layers += [nn.SiLU(), nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]
            # Sharp edges are drawn at the upsampled resolutions: give them a block each.
            layers += [ResBlock(widths[i + 1])]
        layers += [nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup into an EMA-updated codebook, straight-through gradients.

    Buffers (not parameters): the optimiser must not touch the codebook, the EMA does.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.code_dim, self.decay, self.eps = codebook_size, code_dim, decay, eps
        embed = torch.randn(codebook_size, code_dim) * 0.1
        self.register_buffer("embed", embed)
        self.register_buffer("ema_size", torch.ones(codebook_size))
        self.register_buffer("ema_sum", embed.clone())
        # Set from the first training batch: a random codebook sits far from the encoder's
        # outputs, and the first restarts then jolt the decoder with inputs of a new scale.
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [N, D] -> (codes [N], squared distance to the chosen code [N])."""
        flat = flat.float()
        # fp32 even under autocast: in bf16 the expanded distance loses the small
        # differences between nearby codes and the lookup turns into noise.
        with torch.autocast(flat.device.type, enabled=False):
            d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
                 + self.embed.pow(2).sum(1)[None])
        dist, codes = d.min(1)
        return codes, dist.clamp_min(0)

    def forward(self, z: torch.Tensor):
        """z [B, D, h, w] -> (quantised z (straight-through), codes [B, h*w], commitment loss,
        flat encoder outputs [B*h*w, D], their squared quantisation error)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.training and not bool(self.initialised):
            self._init_from(flat.detach())
        codes, dist = self.nearest(flat)
        q = self.embed[codes]
        if self.training:
            self._ema_update(flat.detach(), codes)
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        q = q.view(b, h, w, d).permute(0, 3, 1, 2)
        return q, codes.view(b, h * w), commit, flat.detach(), dist.detach()

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot_sum = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat)
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        self.ema_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot_sum, alpha=1 - self.decay)
        # Laplace smoothing keeps a rarely used code from dividing by ~0.
        n = self.ema_size.sum()
        size = (self.ema_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.ema_sum / size[:, None])

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        # Weighted by distance from the batch mean so that the white background, most of
        # every image, does not take most of the codebook.
        spread = (flat - flat.mean(0)).pow(2).sum(1)
        self.restart(torch.arange(self.codebook_size), flat, spread)
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor,
                generator: torch.Generator | None = None) -> None:
        """Re-seed the codes in `dead` (indices) with encoder outputs drawn in proportion to
        `weights` (their quantisation error): new codes go where the codebook fits worst,
        not onto the white background that dominates every batch."""
        if dead.numel() == 0:
            return
        # drawn on the CPU, with the trainer's CPU generator, wherever the codebook lives
        idx = torch.multinomial(weights.float().cpu() + 1e-12, dead.numel(),
                                replacement=weights.numel() < dead.numel(), generator=generator)
        new = candidates[idx.to(candidates.device)].float()
        dead = dead.to(self.embed.device)
        self.embed[dead] = new
        self.ema_sum[dead] = new
        self.ema_size[dead] = 1.0


class VQVAE(nn.Module):
    def __init__(self, cfg: ImageConfig, codebook_size: int):
        super().__init__()
        self.cfg, self.codebook_size = cfg, codebook_size
        self.encoder = Encoder(cfg.channels, cfg.code_dim, cfg.downsample)
        self.quantizer = VectorQuantizer(codebook_size, cfg.code_dim)
        self.decoder = Decoder(cfg.channels, cfg.code_dim, cfg.downsample)

    def _check(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape [B, 3, {s}, {s}] (image_size={s}), "
                             f"got {list(images.shape)}; resize images to {s}x{s}")

    def forward(self, images: torch.Tensor):
        """Training pass: (reconstruction, codes, commitment loss, flat latents, their error)."""
        self._check(images)
        z = self.encoder(images * 2 - 1)
        q, codes, commit, flat, dist = self.quantizer(z)
        return self.decoder(q) * 0.5 + 0.5, codes, commit, flat, dist

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> LongTensor [B, grid*grid], raster order."""
        self._check(images)
        z = self.encoder(images.to(self.quantizer.embed.device).float() * 2 - 1)
        b, d, h, w = z.shape
        codes, _ = self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d))
        return codes.view(b, h * w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, grid*grid] -> float [B, 3, H, W] in [0, 1]."""
        g = self.cfg.grid
        if codes.dim() != 2 or codes.shape[1] != g * g:
            raise ValueError(f"expected codes of shape [B, {g * g}] ({g}x{g} grid), "
                             f"got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        embed = self.quantizer.embed  # codes may come from another device (the model's)
        q = embed[codes.to(embed.device).long()].view(codes.shape[0], g, g, -1).permute(0, 3, 1, 2)
        return (self.decoder(q) * 0.5 + 0.5).clamp(0, 1)

    def save(self, path: str | Path) -> None:
        """safetensors, written to a temporary name and renamed: never half a checkpoint."""
        path = Path(path)
        meta = {"image_config": json.dumps(self.cfg.__dict__), "codebook_size": str(self.codebook_size)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, cfg: ImageConfig, codebook_size: int) -> "VQVAE":
        model = cls(cfg, codebook_size)
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no VQ-VAE checkpoint at {path}; train one with "
                                    "python -m engine.eval.vq_report --save PATH") from None
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors VQ-VAE checkpoint: {e}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} does not match the config (channels={cfg.channels}, "
                             f"code_dim={cfg.code_dim}, codebook_size={codebook_size}): {e}") from None
        return model.eval()


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (RGB) -> float [B, 3, H, W] in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)


def tensor_to_images(t: torch.Tensor) -> list[Image.Image]:
    """float [B, 3, H, W] in [0, 1] -> PIL images (RGB)."""
    arr = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(a) for a in arr.cpu().numpy()]
