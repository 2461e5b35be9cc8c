"""Trainer callback: progress reports for jobs, cancellation between steps, throughput."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from transformers import TrainerCallback


class RunMonitor(TrainerCallback):
    """Reports progress after every optimizer step and stops the run when ``cancel`` is set.

    On cancel it also asks for a checkpoint, so a cancelled run can be resumed from
    where it stopped.
    """

    def __init__(self, progress: Callable[[dict], None], cancel: threading.Event) -> None:
        self.progress = progress
        self.cancel = cancel
        self.cancelled = False
        self.start_time = 0.0
        self.start_step = 0
        self.start_tokens = 0
        self.seconds = 0.0
        self.last: dict = {}

    def tokens_seen(self, state) -> int:
        return int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def tokens_per_s(self, state) -> float:
        elapsed = time.perf_counter() - self.start_time
        return (self.tokens_seen(state) - self.start_tokens) / elapsed if elapsed > 0 else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.perf_counter()
        self.start_step, self.start_tokens = state.global_step, self.tokens_seen(state)
        self._report(state, "training")

    def on_step_end(self, args, state, control, **kwargs):
        self._report(state, "training")
        if self.cancel.is_set() and not self.cancelled:
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.last["loss"] = round(float(logs["loss"]), 4)
        if "learning_rate" in logs:
            self.last["learning_rate"] = float(logs["learning_rate"])
        if "eval_loss" in logs:
            self.last["eval_loss"] = round(float(logs["eval_loss"]), 4)
        self._report(state, "cancelling" if self.cancelled else "training")

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start_time

    def _report(self, state, phase: str) -> None:
        done = state.global_step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        left = max(0, state.max_steps - state.global_step)
        eta = elapsed / done * left if done > 0 else None
        self.progress({
            "state": phase,
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0.0), 3),
            "loss": self.last.get("loss"),
            "learning_rate": self.last.get("learning_rate"),
            "eval_loss": self.last.get("eval_loss"),
            "tokens_per_s": round(self.tokens_per_s(state), 1),
            "eta_s": round(eta, 1) if eta is not None and math.isfinite(eta) else None,
        })
