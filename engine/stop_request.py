"""Stopping a long training run without losing it.

Ctrl-C (SIGINT) or SIGTERM (what a job scheduler sends before it preempts) asks the training
loop to stop at the end of the step it is in: the loop writes a checkpoint there and raises
TrainingStopped, and `--resume` continues from that step. The VQ-VAE tokenizer's training loop
(engine/tokenizer/vq_train.py), the corpus encoding (engine/data/corpus.py) and the retrieval
dual encoder's training (engine/retrieval/encoder_training.py) stop the same way. Stopping between steps, rather than
where the signal lands, never saves a half-applied optimizer update. A second signal
interrupts at once, as Python's default Ctrl-C does.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """A loop stopped on request after `step` steps (or items: `unit`); a checkpoint holds
    them. `stage` names the loop when it is not the model's (the VQ-VAE's, the corpus
    encoding's, the dual encoder's)."""

    def __init__(self, step: int, signal_name: str, stage: str | None = None,
                 unit: str = "step"):
        where = f"{unit} {step}" if stage is None else f"{stage} {unit} {step}"
        super().__init__(f"stopped by {signal_name} after {where} (checkpoint saved)")
        self.step, self.signal_name, self.stage = step, signal_name, stage

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value  # the shell's convention


class StopRequests:
    """Within `with StopRequests() as stop:`, the first SIGINT / SIGTERM sets `stop.reason`
    (the signal's name) instead of interrupting; the loop polls it between steps. Off the main
    thread (where Python cannot install handlers) it does nothing and signals act as usual."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, _frame) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once, unsaved)", file=sys.stderr, flush=True)
