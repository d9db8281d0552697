"""A long loop's whole state on disk, so that a stopped or crashed stage resumes where it was
(the VQ-VAE's training, engine/tokenizer/vq_state.py; the retrieval dual encoder's,
engine/retrieval/encoder_training.py).

A state is saved with the identity of the settings that made it (steps, seed, config) and
is read back only by a loop with the same identity: resuming under other settings would
silently train something other than what the run's config describes. Writes go to a
temporary name and are renamed, so a crash while saving keeps the previous state.
"""
from __future__ import annotations

from pathlib import Path

import torch


def save_state(path: Path, identity: dict, **fields) -> None:
    """{"identity": identity, **fields} (tensors, state dicts, plain Python values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"identity": identity, **fields}, tmp)
    tmp.replace(path)


def load_state(path: Path, identity: dict, what: str, start_over: str) -> dict:
    """The saved fields, on the CPU. `what` names the loop and `start_over` what deleting the
    file does, for the messages of a broken or foreign file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, and how to start over
        raise ValueError(f"{path} is not a readable {what} training state ({e}); delete it "
                         f"to {start_over}") from None
    if blob.get("identity") != identity:
        raise ValueError(f"{path} was saved by a {what} training with other settings "
                         f"({blob.get('identity')}, this run: {identity}); delete it to "
                         f"{start_over}")
    return blob
