"""Data-parallel training (engine/distributed.py) with two CPU processes under torchrun (gloo):
pretraining and instruction tuning train like one process on the same global batch, rank 0
alone writes, and resuming continues a run. Each process is single-threaded, so the
one-process run is pinned to one thread too and both compute in the same order within a row."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--quiet", "--no-eval", "--set", "image.train_steps=5", "--set", "data.train_size=300",
         "--set", "train.batch_size=4", "--set", "train.log_every=1",
         "--set", "train.autocast_bf16=false"]


def _train(out: Path, *args: str, procs: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "engine.train", "--out", str(out), *args, *SMALL],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~45 s: tokenizers built once, three short runs, two tunings
def test_two_processes_train_like_one_resume_and_tune(tmp_path):
    # Rank 0 builds the tokenizers, the corpus and the judge while rank 1 waits; both runs
    # compared below then start from those same artifacts (loaded, so that the model's
    # initialisation sees the same random state), and only the training is compared.
    built = _train(tmp_path / "built", "--steps", "1", procs=2)
    assert built.returncode == 0, built.stderr[-3000:]
    for run in ("one", "two"):
        for part in ("tokenizer", "data", "eval"):
            shutil.copytree(tmp_path / "built" / part, tmp_path / run / part)
    two = _train(tmp_path / "two", "--steps", "5", procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _train(tmp_path / "one", "--steps", "5")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stderr.count("== model") == 1, "only rank 0 logs"
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000005"]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")),
                               torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=1e-5)

    more = _train(tmp_path / "two", "--steps", "7", "--resume", procs=2)
    assert more.returncode == 0, more.stderr[-3000:]
    assert [r for r in range(1, 8)] == [json.loads(line)["step"] for line in
                                        (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]

    # instruction tuning of that run, in two processes and in one
    sft = ["--sft-from", str(tmp_path / "two"), "--steps", "3", "--set", "sft.examples=100"]
    for procs in (2, 1):
        done = _train(tmp_path / f"sft{procs}", *sft, procs=procs)
        assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "sft2")),
                               torch.tensor(_losses(tmp_path / "sft1")), rtol=1e-5, atol=1e-5)


def test_batch_must_split_evenly():
    from engine.distributed import DataParallel
    dp = DataParallel(rank=1, world=3)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        dp.check_batch(8)
    dp.check_batch(9)
    assert dp.rows(9) == (3, 6) and not dp.main and dp.active
    assert DataParallel().rows(8) == (0, 8)
