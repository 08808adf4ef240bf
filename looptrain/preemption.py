"""Preemption: SIGTERM during `train()` saves a checkpoint at the next optimizer step, then `train()` returns.

Clusters preempt jobs with SIGTERM (then SIGKILL after a grace period). While `train()` runs, looptrain does
not die on it: the loop finishes the optimizer step it is in, saves a checkpoint there (an exact resume point),
and returns; `Trainer.preempted` is then True. The previous handler is back when `train()` returns or raises.
Outside the main thread signals cannot be caught, and training runs unchanged.

transformers.Trainer dies on SIGTERM unless `enable_jit_checkpoint=True`, which saves at once (possibly inside
an accumulation window, which its resume cannot continue exactly). looptrain's handling is always on, and
honours `enable_jit_checkpoint` by construction.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class Preemption:
    """The SIGTERM flag and the loop's three questions about it."""

    def __init__(self):
        self.received = False  # set by the signal handler
        self.stopped = False  # the last train() saved and stopped because of it
        self._saving = False

    @contextlib.contextmanager
    def while_training(self, accelerator):
        """Catch SIGTERM for the duration of `train()`."""
        self.received = self.stopped = self._saving = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigterm(signum, frame):
            self.received = True
            logger.warning("SIGTERM: saving a checkpoint at the next optimizer step, then stopping.")

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def requested(self, accelerator) -> bool:
        """After an optimizer step: did SIGTERM arrive (on any process: they must all stop at the same step)?"""
        flag = self.received
        if accelerator.num_processes > 1:  # one small all-gather per optimizer step, only on several processes
            flag = bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).max().item())
        self._saving = self._saving or flag
        return flag

    def stop_after_save(self) -> bool:
        """After the step's log/evaluate/save: True once the preemption checkpoint is written."""
        if self._saving:
            self._saving, self.stopped = False, True
        return self.stopped
