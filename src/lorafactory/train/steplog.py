"""The per-step record of a run (loss, learning rates, epoch), read back from the device in batches.

Reading a loss on the host waits for the GPU to finish the step; doing it every step keeps the host
from queueing the next step's kernels while the GPU works. Steps are kept as device tensors and
settled together every ``SETTLE_EVERY`` steps and before every checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import IO

import torch

from lorafactory.errors import StageError
from lorafactory.train.events import TrainEvents

SETTLE_EVERY = 25


@dataclass(frozen=True)
class _Step:
    step: int
    loss: torch.Tensor
    lrs: dict[str, float]
    epoch: int
    seconds: float


class StepLog:
    """Collects steps; ``settle`` checks their losses, appends them to ``losses`` and writes the JSON log
    and the TensorBoard events (either may be absent: processes other than the main one write neither)."""

    def __init__(self, losses: list[float], log_file: IO[str] | None, events: TrainEvents | None) -> None:
        self.losses, self.log_file, self.events = losses, log_file, events
        self.pending: list[_Step] = []

    def add(self, step: int, loss: torch.Tensor, lrs: dict[str, float], epoch: int, seconds: float) -> None:
        self.pending.append(_Step(step, loss, lrs, epoch, seconds))
        if len(self.pending) >= SETTLE_EVERY:
            self.settle()

    def settle(self) -> None:
        if not self.pending:
            return
        values = torch.stack([s.loss for s in self.pending]).tolist()  # one wait for the device
        for entry, value in zip(self.pending, values):
            if not math.isfinite(value):
                raise StageError(
                    f"training loss became {value} at step {entry.step}; lower train.unet_lr or train.embedding_lr"
                )
            self.losses.append(value)
            if self.log_file:
                lr = next(iter(entry.lrs.values()))
                record = {"step": entry.step, "loss": value, "lr": lr, "t": round(entry.seconds, 4)}
                self.log_file.write(json.dumps(record) + "\n")
            if self.events:
                self.events.step(entry.step, value, entry.lrs, entry.epoch)
        self.pending.clear()
        if self.log_file:
            self.log_file.flush()
