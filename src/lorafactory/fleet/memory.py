"""Out of GPU memory: the job is retried with settings that need less of it, before it fails.

Training first turns on gradient checkpointing, then halves the batch while raising gradient
accumulation so each optimizer step still sees as many images; evaluation halves its batch.
"""

from __future__ import annotations

import math
import sys

from lorafactory.config import Settings
from lorafactory.errors import exception_chain


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a GPU out-of-memory error."""
    torch = sys.modules.get("torch")
    return torch is not None and any(isinstance(e, torch.cuda.OutOfMemoryError) for e in exception_chain(exc))


def lighter(settings: Settings, stage: str) -> dict | None:
    """A settings layer that needs less GPU memory in ``stage`` (train or evaluate) than
    ``settings``; None when that stage has nothing left to lighten."""
    if stage == "evaluate":
        batch = settings.evaluate.batch_size
        return {"evaluate": {"batch_size": batch // 2}} if batch > 1 else None
    t = settings.train
    if not t.gradient_checkpointing:
        return {"train": {"gradient_checkpointing": True}}
    if t.batch_size > 1:
        batch = t.batch_size // 2
        return {
            "train": {
                "batch_size": batch,
                "gradient_accumulation": math.ceil(t.batch_size * t.gradient_accumulation / batch),
            }
        }
    return None
