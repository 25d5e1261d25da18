"""Outfit clusters: groups of dataset images whose tags (clothes, accessories, scene) go together.

Each image is a tag-presence vector; OPTICS (cosine metric, ``min_samples`` 5, ``xi`` 0.01) finds
the groups, and a cluster's tags present in at least 35% of its images describe it. Evaluation
renders one prompt per cluster, so a character's several outfits are all checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

SHARE = 0.35
MIN_SAMPLES = 5
XI = 0.01


@dataclass(frozen=True)
class OutfitCluster:
    tags: list[str]  # most frequent first
    size: int

    @property
    def images(self) -> int:
        """Evaluation images for the cluster: 1 below 10 dataset images, 2 below 20, else 3."""
        return 1 if self.size < 10 else 2 if self.size < 20 else 3


def outfit_clusters(image_tags: list[list[str]], ignore: set[str] = frozenset()) -> list[OutfitCluster]:
    """Clusters of the images' tag sets (tags in ``ignore`` left out), largest first.

    Fewer than ``2 * MIN_SAMPLES`` images, or tag sets that form no group, give no clusters.
    """
    from sklearn.cluster import OPTICS

    sets = [sorted(set(tags) - ignore) for tags in image_tags]
    vocabulary = sorted({tag for tags in sets for tag in tags})
    if len(sets) < 2 * MIN_SAMPLES or not vocabulary:
        return []
    index = {tag: i for i, tag in enumerate(vocabulary)}
    vectors = np.zeros((len(sets), len(vocabulary)), dtype=np.float32)
    for row, tags in enumerate(sets):
        vectors[row, [index[tag] for tag in tags]] = 1.0
    usable = vectors.sum(axis=1) > 0  # the cosine metric needs a non-zero vector
    labels = np.full(len(sets), -1)
    with np.errstate(divide="ignore", invalid="ignore"):  # OPTICS divides by zero reachabilities of identical tag sets
        labels[usable] = OPTICS(metric="cosine", min_samples=MIN_SAMPLES, xi=XI).fit(vectors[usable]).labels_
    clusters = []
    for label in sorted(set(labels.tolist()) - {-1}):
        members = [sets[i] for i in np.flatnonzero(labels == label)]
        counts = Counter(tag for tags in members for tag in tags)
        common = [
            tag for tag, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= SHARE * len(members)
        ]
        if common:
            clusters.append(OutfitCluster(common, len(members)))
    return sorted(clusters, key=lambda c: -c.size)
