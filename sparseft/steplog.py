"""A training loop's per-step figures (loss, terms predicted right, learning rate), read from the device in batches.

Reading a loss with `.item()` makes the host wait for the device at every step; on a GPU that keeps
the host from queueing the next step while the device works. `StepLog` holds each step's figures as
device tensors and reads them all at once every `every` steps and at the end of an epoch (one wait
each time). The running sums, the progress bar's loss and the per-step curves are the same as when
reading every step; only a non-finite loss is seen up to `every - 1` steps late, and the run then
stops naming the first bad step. On a CPU there is nothing to wait for and the loop reads every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: steps between reads on an accelerator (on a CPU: every step)
READ_EVERY = 25


@dataclass
class StepLog:
    """Per-step figures of one epoch; `on_step(step, loss, lr)` sees each step's loss once it is read."""

    every: int
    on_step: Callable[[int, float, float], None]
    loss_sum: float = 0.0  # sum over read steps of mean loss x terms
    correct: int = 0
    _pending: list[tuple[int, torch.Tensor, int, torch.Tensor, float]] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: torch.device, on_step: Callable[[int, float, float], None]) -> StepLog:
        return cls(every=1 if device.type == "cpu" else READ_EVERY, on_step=on_step)

    def add(self, step: int, mean_loss: torch.Tensor, terms: int, correct: torch.Tensor,
            lr: float) -> tuple[int, float] | None:
        """Note step `step` (1-based); returns (step, loss) of the first non-finite loss once read, else None."""
        self._pending.append((step, mean_loss.detach(), terms, torch.as_tensor(correct), lr))
        return self.read() if len(self._pending) >= max(self.every, 1) else None

    def read(self) -> tuple[int, float] | None:
        """Read the pending steps from the device (one wait); (step, loss) of the first non-finite loss, else None."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        device = pending[0][1].device
        # losses and counts in one tensor, one read (float64 holds both exactly: a float32 loss, a count < 2**53)
        figures = torch.stack([torch.stack([p[1].reshape(()).double(), p[3].to(device).reshape(()).double()])
                               for p in pending]).tolist()
        for (step, _, terms, _, lr), (loss, right) in zip(pending, figures):
            if not math.isfinite(loss):
                return step, loss
            self.loss_sum += loss * terms
            self.correct += int(right)
            self.on_step(step, loss, lr)
        return None
