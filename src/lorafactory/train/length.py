"""How many steps a run trains: fixed (``train.max_steps``), or from the dataset's size.

The size rule is the reference's v1.5 one, in epochs of the effective batch: ``epochs`` passes over
the images, at least ``min_steps``, and at most the larger of ``cap_epochs`` passes and ``cap_steps``;
rounded up to a whole number of checkpoint intervals, so the last step is on the checkpoint grid.
"""

from __future__ import annotations

import math

from lorafactory.config import Settings, TrainSettings


def samples_per_step(t: TrainSettings) -> int:
    """Images one optimizer step sees, over all processes."""
    return t.batch_size * t.gradient_accumulation * t.num_processes


def planned_steps(t: TrainSettings, images: int) -> int:
    """The run's step count for a dataset of ``images`` training images."""
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = max(images, 1) / samples_per_step(t)
    steps = min(max(t.epochs * per_epoch, t.min_steps), max(t.cap_epochs * per_epoch, t.cap_steps))
    return math.ceil(round(steps, 6) / t.save_every) * t.save_every


def with_planned_steps(settings: Settings, images: int) -> Settings:
    """The settings with ``train.max_steps`` fixed to the planned count (the same object when already fixed)."""
    if settings.train.max_steps is not None:
        return settings
    planned = settings.model_copy(deep=True)
    planned.train.max_steps = planned_steps(settings.train, images)
    return planned
