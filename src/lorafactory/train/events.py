"""TensorBoard event files of a training run, with the scalar names kohya's scripts use, so
``tensorboard --logdir <workspace>`` and the tools that read kohya's logs show our runs.

Written with tensorboardX (no TensorFlow). A resumed run purges the events past its saved step,
so the curves have no doubled stretch. Each checkpoint closes the event file, because only closing
waits for tensorboardX's writer thread (its flush does not): the events a saved state covers are on
disk before that state, so a killed run loses none of them. Later steps go to a new file.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

FOLDER = "tensorboard"
LR_TAGS = {"lora": "lr/unet", "text_lora": "lr/textencoder", "embedding": "lr/embedding"}


class TrainEvents:
    def __init__(self, out_dir: Path, start_step: int, window: int) -> None:
        self.folder = out_dir / FOLDER
        self.purge_step = start_step + 1 if start_step else None  # events past the saved step are dropped
        self.open_writer: SummaryWriter | None = None
        self.recent: deque[float] = deque(maxlen=max(window, 1))  # about one epoch, as kohya averages
        self.epoch_losses: list[float] = []
        self.epoch: int | None = None
        self.last_step = start_step

    def step(self, step: int, loss: float, lrs: dict[str, float], epoch: int) -> None:
        if self.epoch is not None and epoch != self.epoch and self.epoch_losses:
            self.writer.add_scalar("loss/epoch_average", sum(self.epoch_losses) / len(self.epoch_losses), self.epoch)
            self.epoch_losses = []
        self.epoch, self.last_step = epoch, step
        self.recent.append(loss)
        self.epoch_losses.append(loss)
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", sum(self.recent) / len(self.recent), step)
        for name, lr in lrs.items():
            self.writer.add_scalar(LR_TAGS.get(name, f"lr/{name}"), lr, step)
        if "text_lora" not in lrs and "embedding" in lrs:  # the trigger's vectors are the text encoder's part
            self.writer.add_scalar("lr/textencoder", lrs["embedding"], step)

    def up_to(self, validation: dict[str, float] | None) -> None:
        """At a checkpoint, before its state is saved: the step's validation loss, and everything on disk
        (a resumed run drops the events past its saved step and never writes these again)."""
        if validation is not None:
            self.writer.add_scalar("loss/validation/step_average", validation["mean"], self.last_step)
        self.close()

    @property
    def writer(self) -> SummaryWriter:
        """The open event file, started at the first event after a checkpoint."""
        if self.open_writer is None:
            from tensorboardX import SummaryWriter

            self.open_writer = SummaryWriter(
                str(self.folder), purge_step=self.purge_step, flush_secs=30, filename_suffix=f".{self.last_step:07d}"
            )
            self.purge_step = None  # once per session
        return self.open_writer

    def close(self) -> None:
        if self.open_writer is not None:
            self.open_writer.close()
            self.open_writer = None
