"""CCIP purity: keep the images of the dataset's main character.

A reference cluster is bootstrapped from the first images with OPTICS; it must hold a clear share
of the clustered images. Then every image is kept when CCIP judges it the same character as at
least ``min_match`` of the reference images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafactory.vision import ccip


@dataclass(frozen=True)
class PurityResult:
    keep: list[bool]
    reference_size: int
    note: str


def purify(
    features: np.ndarray, model_name: str, bootstrap: int, cluster_share: float, min_match: float, threshold: float
) -> PurityResult:
    n = len(features)
    if n < bootstrap:
        return PurityResult([True] * n, 0, f"skipped: {n} images, fewer than prepare.purity_bootstrap={bootstrap}")
    labels = ccip.cluster(features[:bootstrap], model_name)
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return PurityResult([True] * n, 0, "skipped: the bootstrap images formed no cluster")
    values, counts = np.unique(clustered, return_counts=True)
    top = int(values[np.argmax(counts)])
    if counts.max() < cluster_share * clustered.size:
        return PurityResult([True] * n, 0, "skipped: no cluster dominates the bootstrap images")
    reference = features[:bootstrap][labels == top]
    same = ccip.differences(features, reference, model_name) < threshold
    keep = (same.mean(axis=1) >= min_match).tolist()
    return PurityResult(keep, len(reference), f"reference cluster of {len(reference)} images")
