"""Openings, endings and other shots that recur across a show's episodes.

Every sampled frame carries a signature: a 16×9 greyscale thumbnail. A frame recurs when a frame
of at least ``min_episodes`` other episodes is within ``distance`` of it (the root mean square
difference of the thumbnails, on a 0–255 scale, so small changes such as credits or encoding noise
still match); a shot recurs when any of its frames does. Comparisons run per episode against the
others in blocks, so memory stays small for a whole season.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from PIL import Image

SIGNATURE_SIZE = (16, 9)
BLOCK = 4096


def signature(image: Image.Image) -> np.ndarray:
    """The frame's 16×9 greyscale thumbnail, flattened (uint8)."""
    return np.asarray(image.convert("L").resize(SIGNATURE_SIZE, Image.Resampling.BOX), dtype=np.uint8).reshape(-1)


def rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] root mean square differences between signatures."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0) / a.shape[1])


def recurring_frames(
    signatures: Mapping[str, np.ndarray], min_episodes: int, distance: float
) -> dict[str, np.ndarray]:
    """Per episode, a boolean per frame: whether frames like it appear in ``min_episodes`` other
    episodes (at most all the others, so a two-episode show still finds its opening)."""
    names = list(signatures)
    needed = max(1, min(min_episodes, len(names) - 1))
    found: dict[str, np.ndarray] = {}
    for name in names:
        mine = signatures[name]
        seen_in = np.zeros(len(mine), dtype=np.int32)
        for other in names:
            if other == name or not len(signatures[other]) or not len(mine):
                continue
            hit = np.zeros(len(mine), dtype=bool)
            for start in range(0, len(signatures[other]), BLOCK):
                hit |= (rms_distances(mine, signatures[other][start : start + BLOCK]) <= distance).any(axis=1)
            seen_in += hit
        found[name] = seen_in >= needed if len(names) > 1 else np.zeros(len(mine), dtype=bool)
    return found


def recurring_shots(frame_shots: np.ndarray, recurring: np.ndarray) -> set[int]:
    """The shots (numbers within one episode) with at least one recurring frame."""
    return {int(shot) for shot in np.unique(frame_shots[recurring])}
