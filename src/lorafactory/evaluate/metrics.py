"""Metrics of generated images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecScore:
    """CCIP RecScore: the share of (generated, dataset) pairs judged the same character.

    ``image_share`` is the easier-to-read companion: the share of generated images that match
    at least half of the dataset images. ``per_image`` keeps each image's matched fraction.
    """

    pair_share: float
    image_share: float
    per_image: list[float]


def ccip_recscore(differences: np.ndarray, threshold: float) -> RecScore:
    """``differences`` is [generated, dataset]; a pair matches when its difference is below ``threshold``."""
    if differences.size == 0:
        raise ValueError("RecScore needs at least one generated and one dataset image")
    matched = (differences < threshold).mean(axis=1)
    return RecScore(float(matched.mean()), float((matched >= 0.5).mean()), [float(x) for x in matched])
