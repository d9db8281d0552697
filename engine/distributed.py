"""Data-parallel training over the processes torchrun starts (one per GPU; gloo on CPU).

    torchrun --standalone --nproc_per_node 8 -m engine.train --preset cm3leon-350m --out runs/350m

The batch stays global: every process packs the same `train.batch_size` rows from the same
document stream and trains its own slice of them (batch_size / world rows), and each
slice's loss is weighted by its share of the whole batch's targets. DDP averages the
gradients over processes, so the update is the one a single process would make on the whole
batch; world size, like train.micro_batch_size, changes memory and time, not the training.
Only rank 0 builds the tokenizers and the corpus (the others wait, then load them), writes
checkpoints and metrics, and evaluates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over processes (in place; returned)."""
        if self.active:
            dist.all_reduce(x)
        return x

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` is True on any process: all of them then act on it together."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item() > 0)

    def rows(self, batch_size: int) -> tuple[int, int]:
        """This process's slice [start, end) of a batch's rows."""
        per = batch_size // self.world
        return self.rank * per, (self.rank + 1) * per

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"train.batch_size {batch_size} must be a multiple of the "
                             f"{self.world} processes (each trains batch_size / world rows)")

    def device(self, requested: str | None) -> torch.device:
        """The device asked for, or by default the GPU when there is one; under torchrun on a
        GPU machine, the process's own GPU."""
        if requested not in (None, "cuda") or not torch.cuda.is_available():
            return torch.device(requested or "cpu")
        return torch.device("cuda", self.local_rank) if self.active else torch.device("cuda")


def from_env() -> DataParallel:
    """The process group torchrun describes (WORLD_SIZE > 1), joined; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        # NCCL for GPU tensors and gloo for CPU ones, so --device cpu works on a GPU machine
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return DataParallel(rank, world, local)


def leave(dp: DataParallel) -> None:
    """Tear the process group down at the end of a run (a no-op for one process)."""
    if dp.active and dist.is_initialized():
        dist.destroy_process_group()
