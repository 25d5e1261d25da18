"""The group of training processes as the trainer sees it (torch.distributed through accelerate).

Every process draws the same random numbers and builds the same micro-batches; process ``r`` of
``N`` computes the micro-batches whose index is ``r`` modulo ``N``, and gradients are summed across
processes before each optimizer step. So N processes with gradient accumulation A train the same
model as one process with accumulation N·A, and a saved state is the same whichever process count
wrote it. The processes are started by ``lorafactory.launch.torchrun``.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

WORKER_ENV = "LORAFACTORY_TRAIN_WORKER"


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


class Collective:
    """The group of training processes as the trainer sees it; a group of one outside a launch."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.size, self.device = 0, 1, None
        self._state = None
        if in_worker() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self._state = PartialState(cpu=device.type == "cpu")
            self.rank, self.size, self.device = (
                self._state.process_index,
                self._state.num_processes,
                self._state.device,
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, micro_batch: int) -> bool:
        return micro_batch % self.size == self.rank

    def sum_gradients(self, params: Iterable[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient (and the loss) over the processes, in one flat all-reduce.

        A parameter no process computed a gradient for keeps ``grad = None``, exactly as in one
        process, so the optimizer skips it the same way."""
        if self.size == 1:
            return loss
        from accelerate.utils import reduce

        params = [p for p in params if p.requires_grad]
        present = reduce(
            torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=loss.device), "sum"
        )
        used = [p for p, count in zip(params, present.tolist()) if count > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = reduce(torch.cat([p.grad.reshape(-1) for p in used] + [loss.reshape(1).float()]), "sum")
        offset = 0
        for p in used:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return flat[-1]

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()
