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
    episodes (at most all the others, so a two-episode show still finds its opening). Each pair of
    episodes is compared once, in blocks, and marks the frames of both."""
    names = list(signatures)
    needed = max(1, min(min_episodes, len(names) - 1))
    seen_in = {name: np.zeros(len(signatures[name]), dtype=np.int32) for name in names}
    for position, name in enumerate(names):
        for other in names[position + 1 :]:
            mine, theirs = signatures[name], signatures[other]
            hit_mine, hit_theirs = np.zeros(len(mine), dtype=bool), np.zeros(len(theirs), dtype=bool)
            for a in range(0, len(mine), BLOCK):
                for b in range(0, len(theirs), BLOCK):
                    close = rms_distances(mine[a : a + BLOCK], theirs[b : b + BLOCK]) <= distance
                    hit_mine[a : a + BLOCK] |= close.any(axis=1)
                    hit_theirs[b : b + BLOCK] |= close.any(axis=0)
            seen_in[name] += hit_mine
            seen_in[other] += hit_theirs
    return {name: seen_in[name] >= needed if len(names) > 1 else seen_in[name] > 0 for name in names}


def recurring_shots(frame_shots: np.ndarray, recurring: np.ndarray) -> set[int]:
    """The shots (numbers within one episode) with at least one recurring frame."""
    return {int(shot) for shot in np.unique(frame_shots[recurring])}
