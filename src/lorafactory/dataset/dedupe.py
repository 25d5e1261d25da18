"""Near-duplicate removal: a perceptual hash finds candidate pairs, LPIPS decides."""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image

from lorafactory.vision import lpips


def dhash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: brightness gradients of a (size+1) x size greyscale thumbnail."""
    pixels = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicates(
    images: Sequence[Image.Image],
    mode: Literal["lpips", "phash"],
    hash_distance: int,
    lpips_threshold: float,
    on_item: Callable[[], None] | None = None,
) -> list[int]:
    """Indices to drop: each image that duplicates an earlier kept one.

    ``phash``: hash distance at most ``hash_distance`` decides. ``lpips``: pairs within a loose hash
    distance (4x) are candidates, and an LPIPS difference under ``lpips_threshold`` decides.
    """
    hashes = [dhash(image) for image in images]
    candidate_distance = hash_distance if mode == "phash" else 4 * hash_distance
    feats: dict[int, object] = {}
    kept: list[int] = []
    dropped: list[int] = []
    for i, image in enumerate(images):
        if on_item:
            on_item()
        duplicate = False
        for j in kept:
            if hamming(hashes[i], hashes[j]) > candidate_distance:
                continue
            if mode == "phash":
                duplicate = True
            else:
                for k in (i, j):
                    if k not in feats:
                        feats[k] = lpips.features(images[k])
                duplicate = lpips.difference(feats[i], feats[j]) < lpips_threshold
            if duplicate:
                break
        (dropped if duplicate else kept).append(i)
    return dropped
