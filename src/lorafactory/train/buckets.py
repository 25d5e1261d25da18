"""Aspect-ratio buckets.

Default (``no_upscale``): an image larger than the target area is shrunk to that area, keeping its
aspect ratio; a smaller one keeps its size. Its bucket is that size floored to multiples of
``step``, and the remainder is centre-cropped, never padded.

``fixed`` (the classic mode): a fixed list of buckets of about the target area; each image goes to
the bucket nearest its aspect ratio, scaled to cover it (small images are upscaled), centre-cropped.

Batches are drawn from one bucket at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Fit:
    resized: tuple[int, int]
    bucket: tuple[int, int]


def fit(width: int, height: int, resolution: int, step: int) -> Fit | None:
    """Where a ``width`` x ``height`` image goes; None when a side is shorter than one step."""
    area = resolution * resolution
    if width * height > area:
        scale = math.sqrt(area / (width * height))
        # round both ways and keep the one whose aspect ratio is closer to the original
        candidates = []
        for w in (math.floor(width * scale), math.ceil(width * scale)):
            h = min(height, max(1, int(area // max(w, 1))))
            candidates.append((abs(w / h - width / height), w, h))
        _, new_w, new_h = min(candidates)
        new_w, new_h = min(new_w, width), min(new_h, height)
    else:
        new_w, new_h = width, height
    bucket = (new_w // step * step, new_h // step * step)
    if bucket[0] == 0 or bucket[1] == 0:
        return None
    return Fit((new_w, new_h), bucket)


def apply(image: Image.Image, placement: Fit) -> Image.Image:
    """Resize (down only) and centre-crop ``image`` to its bucket."""
    if image.size != placement.resized:
        image = image.resize(placement.resized, Image.Resampling.LANCZOS)
    (w, h), (bw, bh) = placement.resized, placement.bucket
    left, top = (w - bw) // 2, (h - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def fixed_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """The classic bucket list: the square bucket plus (w, h) and (h, w) for each width step."""
    area = resolution * resolution
    side = int(math.sqrt(area)) // step * step
    found = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            found |= {(width, height), (height, width)}
    return sorted(found)


def fit_fixed(width: int, height: int, bucket_list: list[tuple[int, int]]) -> Fit:
    """The bucket nearest the image's aspect ratio; the image is scaled to cover it."""
    ratio = width / height
    bucket = min(bucket_list, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return Fit(resized, bucket)
