"""TensorBoard event files of a training run, with the scalar names kohya's scripts use, so
``tensorboard --logdir <workspace>`` and the tools that read kohya's logs show our runs.

Written with tensorboardX (no TensorFlow). A resumed run purges the events past its saved step,
so the curves have no doubled stretch.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

FOLDER = "tensorboard"
LR_TAGS = {"lora": "lr/unet", "text_lora": "lr/textencoder", "embedding": "lr/embedding"}


class TrainEvents:
    def __init__(self, out_dir: Path, start_step: int, window: int) -> None:
        from tensorboardX import SummaryWriter

        # events from step start_step + 1 on, written before an interruption, are dropped
        self.writer = SummaryWriter(
            str(out_dir / FOLDER), purge_step=start_step + 1 if start_step else None, flush_secs=30
        )
        self.recent: deque[float] = deque(maxlen=max(window, 1))  # about one epoch, as kohya averages
        self.epoch_losses: list[float] = []
        self.epoch: int | None = None

    def step(self, step: int, loss: float, lrs: dict[str, float], epoch: int) -> None:
        if self.epoch is not None and epoch != self.epoch and self.epoch_losses:
            self.writer.add_scalar("loss/epoch_average", sum(self.epoch_losses) / len(self.epoch_losses), self.epoch)
            self.epoch_losses = []
        self.epoch = epoch
        self.recent.append(loss)
        self.epoch_losses.append(loss)
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", sum(self.recent) / len(self.recent), step)
        for name, lr in lrs.items():
            self.writer.add_scalar(LR_TAGS.get(name, f"lr/{name}"), lr, step)
        if "text_lora" not in lrs and "embedding" in lrs:  # the trigger's vectors are the text encoder's part
            self.writer.add_scalar("lr/textencoder", lrs["embedding"], step)

    def validation(self, step: int, mean: float) -> None:
        self.writer.add_scalar("loss/validation/step_average", mean, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
