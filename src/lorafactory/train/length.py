"""How many steps a run trains: fixed (``train.max_steps``), or from the dataset's size.

The size rule is the reference's v1.5 one, in epochs of the effective batch: ``epochs`` passes over
the images, at least ``min_steps``, and at most the larger of ``cap_epochs`` passes and ``cap_steps``;
rounded up to a whole ``save_every``. Every checkpoint is evaluated, so a long run saves every whole
multiple of ``save_every`` that keeps it within ``max_checkpoints`` (and at its last step, as every run does).
"""

from __future__ import annotations

import math

from lorafactory.config import Settings, TrainSettings


def samples_per_step(t: TrainSettings) -> int:
    """Images one optimizer step sees, over all processes."""
    return t.batch_size * t.gradient_accumulation * t.num_processes


def planned_schedule(t: TrainSettings, images: int) -> tuple[int, int]:
    """The run's step count and checkpoint interval for a dataset of ``images`` training images."""
    if t.max_steps is not None:
        return t.max_steps, t.save_every
    per_epoch = max(images, 1) / samples_per_step(t)
    steps = min(max(t.epochs * per_epoch, t.min_steps), max(t.cap_epochs * per_epoch, t.cap_steps))
    steps = math.ceil(round(steps, 6) / t.save_every) * t.save_every
    widen = math.ceil(steps / (t.save_every * t.max_checkpoints)) if t.max_checkpoints else 1
    return steps, t.save_every * widen


def with_planned_steps(settings: Settings, images: int) -> Settings:
    """The settings with ``train.max_steps`` and ``train.save_every`` fixed to the planned schedule (the same
    object when the step count is already fixed)."""
    if settings.train.max_steps is not None:
        return settings
    planned = settings.model_copy(deep=True)
    planned.train.max_steps, planned.train.save_every = planned_schedule(settings.train, images)
    return planned
