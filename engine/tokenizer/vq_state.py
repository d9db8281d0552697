"""The VQ-VAE training loop's whole state on disk, so that a stopped or crashed tokenizer
stage resumes where it was instead of starting over (hours at the paper's 256-pixel images).

Everything the next step reads is kept: the weights and codebook buffers, AdamW's moments,
the data generator (batches, flips, channel orders and code restarts all draw from it), the
dead-code bookkeeping and the last latents that restarts sample from. A resumed run
therefore ends with exactly the weights of one that never stopped (tested bitwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import training_state


@dataclass
class VQTrainingState:
    step: int = 0                        # steps done
    usage: float = 0.0                   # share of codes hit lately (the progress bar's)
    seconds: float = 0.0                 # training time spent before this process
    last_hit: torch.Tensor | None = None              # int64 [codebook]: last step a code was hit
    recent_latents: list[torch.Tensor] = field(default_factory=list)
    recent_err: list[torch.Tensor] = field(default_factory=list)


def _identity(steps: int, seed: int, codebook_size: int, image_cfg) -> dict:
    """What a saved state must match: resuming under other settings would silently train a
    different tokenizer than the run's config describes."""
    return {"steps": steps, "seed": seed, "codebook_size": codebook_size,
            "image": dict(sorted(vars(image_cfg).items()))}


def save_state(path: Path, state: VQTrainingState, model, opt, gen: torch.Generator,
               steps: int, seed: int, image_cfg) -> None:
    training_state.save_state(
        path, _identity(steps, seed, model.codebook_size, image_cfg),
        step=state.step, usage=state.usage, seconds=state.seconds,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=opt.state_dict(), generator=gen.get_state(), last_hit=state.last_hit.cpu(),
        recent_latents=[t.detach().cpu() for t in state.recent_latents],
        recent_err=[t.detach().cpu() for t in state.recent_err])


def load_state(path: Path, model, opt, gen: torch.Generator, steps: int, seed: int,
               image_cfg) -> VQTrainingState:
    """Restores model, optimizer and generator in place; returns the loop's own state."""
    device = next(model.parameters()).device
    blob = training_state.load_state(path, _identity(steps, seed, model.codebook_size, image_cfg),
                                     "VQ-VAE", "train the tokenizer from the start")
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    gen.set_state(blob["generator"])
    return VQTrainingState(
        step=blob["step"], usage=blob["usage"], seconds=blob["seconds"],
        last_hit=blob["last_hit"],
        recent_latents=[t.to(device) for t in blob["recent_latents"]],
        recent_err=[t.to(device) for t in blob["recent_err"]])
