"""Frames from anime episodes, sampled per shot: decoded with PyAV, cut into shots by a content
detector, a few frames taken from each shot.

Keyframes miss shots (an encoder puts them every few seconds, not at every cut), so every frame is
decoded and compared with the previous one on a small HSV thumbnail, as PySceneDetect's
ContentDetector does: a cut is where the mean change of hue, saturation and value passes
``cut_threshold`` (27 on a 0–255 scale), at least ``min_shot_frames`` (15) frames after the last
cut. From each shot, frames are taken ``first_s`` (0.25 s) after it starts and then every
``gap_s`` (1 s, at least 0.5 s) up to ``per_shot`` (3), so long static shots do not flood a
character's cluster; dark frames (fades, black) are skipped. Frames are chosen while decoding:
memory stays one frame and a thumbnail, whatever the shot length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from lorafactory.errors import InputError

THUMB_WIDTH = 128


class EpisodeError(InputError):
    """An episode file that cannot be decoded (corrupt, truncated at its start, not a video)."""


@dataclass(frozen=True)
class Sampling:
    per_shot: int = 3
    first_s: float = 0.25
    gap_s: float = 1.0
    cut_threshold: float = 27.0
    min_shot_frames: int = 15
    dark_value: float = 24.0  # mean HSV value (0–255) below which a frame counts as dark


@dataclass(frozen=True)
class SampledFrame:
    time: float  # seconds from the episode's start
    index: int  # frame number in the episode
    shot: int  # shot number in the episode, from 0
    image: Image.Image


def _hsv_thumbnail(frame) -> np.ndarray:
    import cv2

    height = max(2, round(THUMB_WIDTH * frame.height / max(frame.width, 1)))
    rgb = frame.reformat(width=THUMB_WIDTH, height=height, format="rgb24", interpolation="FAST_BILINEAR").to_ndarray()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int16)


def content_change(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean absolute change of hue, saturation and value (the mean of the three), as ContentDetector
    scores a cut."""
    return float(np.abs(current - previous).mean())


def sample_frames(path: Path, sampling: Sampling = Sampling()) -> Iterator[SampledFrame]:
    """Frames of one episode, a few per shot, in order."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise EpisodeError(f"{path.name}: not a readable video ({exc.__class__.__name__}); skipped") from exc
    with container:
        if not container.streams.video:
            raise EpisodeError(f"{path.name}: has no video stream; skipped")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from _per_shot(path, container.decode(stream), float(stream.average_rate or 24), sampling)


def _per_shot(path: Path, frames, fps: float, sampling: Sampling) -> Iterator[SampledFrame]:
    import av

    shot, shot_start, last_cut, taken, previous = 0, None, 0, 0, None
    index = -1
    try:
        for index, frame in enumerate(frames):
            time = float(frame.time if frame.time is not None else index / fps)
            thumb = _hsv_thumbnail(frame)
            if previous is not None and index - last_cut >= sampling.min_shot_frames:
                if content_change(previous, thumb) >= sampling.cut_threshold:
                    shot, shot_start, last_cut, taken = shot + 1, time, index, 0
            previous = thumb
            if shot_start is None:
                shot_start = time
            due = shot_start + sampling.first_s + taken * max(sampling.gap_s, 0.5)
            if taken < sampling.per_shot and time >= due and thumb[..., 2].mean() >= sampling.dark_value:
                taken += 1
                yield SampledFrame(time, index, shot, frame.to_image())
    except av.error.FFmpegError as exc:
        if index < 0:
            raise EpisodeError(f"{path.name}: cannot be decoded ({exc.__class__.__name__}); skipped") from exc
        raise EpisodeError(
            f"{path.name}: decoding stopped at frame {index + 1} ({exc.__class__.__name__}); "
            "the frames before it were kept"
        ) from exc
