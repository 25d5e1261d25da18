"""Trainable weights computed in half precision, kept and updated in float32 (``train.autocast = false``).

Under autocast every float32 LoRA weight is cast to the half-precision dtype at each use and its
gradient cast back, and the norms run in float32 between casts of their activations: on a GPU those
casts were the most frequent operators of a step and its largest share of copy time. Here the modules
hold half-precision working copies instead and everything computes in that dtype; the float32
masters are what the optimizer steps, the checkpoints export and the saved state holds. A working
copy equals what autocast's cast would give, so only the norms' precision differs from autocast.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """Float32 masters for ``params`` (which become half-precision working copies in their modules)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], dtype: torch.dtype) -> None:
        self.working = list(params.values())
        self.masters = {name: torch.nn.Parameter(p.detach().float().clone()) for name, p in params.items()}
        self._grads = [torch.zeros_like(master) for master in self.masters.values()]
        self._by_working = {id(w): m for w, m in zip(self.working, self.masters.values())}
        for param in self.working:
            param.data = param.data.to(dtype)

    def master_of(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 master of a working copy (what a checkpoint exports); other tensors as they are."""
        return self._by_working.get(id(weight), weight)

    def gather_gradients(self) -> None:
        """Move the working copies' gradients of one backward pass into the masters' grads, in float32: a
        master without a gradient yet this step (the optimizer's ``zero_grad`` set it to None) gets a copy,
        one with a gradient from an earlier micro-batch gets the sum."""
        copy: tuple[list, list] = ([], [])
        add: tuple[list, list] = ([], [])
        for working, master, buffer in zip(self.working, self.masters.values(), self._grads):
            if working.grad is None:
                continue
            into = add if master.grad is not None else copy
            into[0].append(buffer)
            into[1].append(working.grad)
            master.grad = buffer
            working.grad = None
        if copy[0]:
            torch._foreach_copy_(*copy)
        if add[0]:
            torch._foreach_add_(*add)

    @torch.no_grad()
    def publish(self) -> None:
        """Copy the masters into the working copies (after an optimizer step, or a resume)."""
        torch._foreach_copy_(self.working, list(self.masters.values()))
