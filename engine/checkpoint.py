"""Checkpoints: safetensors written atomically, verified on load, never unpickled.

Layout: RUN/checkpoints/step_00001200/{model.safetensors, optim.safetensors, state.json}, plus
average.safetensors when training keeps an EMA of the weights (engine/weight_average.py): the
weights inference loads by default.
A checkpoint is written into a hidden temporary folder and renamed into place in one step,
so a crash leaves either the whole checkpoint or none of it. state.json records the sha256
of each tensor file; a truncated or altered file is reported as corrupt by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


AVERAGE_FILE = "average.safetensors"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so keep one name each.
    seen, out = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.shape)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def _optim_tensors(optim: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optim.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model, optim, extra: dict, keep: int = 2,
                    average=None) -> Path:
    """`average`: a WeightAverage whose weights are saved alongside (average.safetensors)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_model_tensors(model), str(tmp / "model.safetensors"))
    optim_tensors, optim_meta = _optim_tensors(optim)
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    files = ["model.safetensors", "optim.safetensors"]
    state = {"step": step, "optim": optim_meta, **extra}
    if average is not None:
        save_file(average.tensors(), str(tmp / AVERAGE_FILE))
        files.append(AVERAGE_FILE)
        state["average"] = {"decay": average.decay, "updates": average.updates}
    state["sha256"] = {f: _sha256(tmp / f) for f in files}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    with open(tmp / "state.json") as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}: train first "
                              f"(python -m engine.train --out {run_dir}) or drop --resume")
    return ckpts[-1]


def _verified(path: Path, name: str, state: dict) -> dict[str, torch.Tensor]:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} is missing {name}; delete that folder to "
                              "resume from the one before it")
    if state.get("sha256", {}).get(name) != _sha256(f):
        raise CheckpointError(f"checkpoint file {f} is corrupt or truncated (checksum mismatch); "
                              "delete that checkpoint folder to resume from the one before it")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {f} cannot be read ({exc})") from exc


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable state.json ({exc}); delete "
                              "that folder to use the one before it") from exc


def load_model_weights(path: Path, model: torch.nn.Module, averaged: bool = False) -> dict:
    """Load the step's weights, or with `averaged` the EMA weights where the checkpoint has
    them (a run trained without an average has only the step's)."""
    state = read_state(path)
    tensors = _verified(Path(path), "model.safetensors", state)
    if averaged and "average" in state:
        # A tensor the model lacks shows up below as `unexpected`.
        tensors.update(_verified(Path(path), AVERAGE_FILE, state))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n == "lm_head.weight" and getattr(model.cfg, "tie_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model (missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    return state


def load_average(path: Path, average, state: dict) -> None:
    """Restore a WeightAverage from a checkpoint (resume)."""
    if "average" not in state:
        raise CheckpointError(f"checkpoint {path} has no weight average; resume it with "
                              "--set train.ema_decay=0, or start the run afresh")
    try:
        average.load(_verified(Path(path), AVERAGE_FILE, state), state["average"]["updates"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc


def load_optimizer(path: Path, optim: torch.optim.Optimizer, state: dict) -> None:
    tensors = _verified(Path(path), "optim.safetensors", state)
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, _, name = key.partition(".")
        per_param.setdefault(int(idx), {})[name] = t
    optim.load_state_dict({"state": per_param, "param_groups": state["optim"]["param_groups"]})
