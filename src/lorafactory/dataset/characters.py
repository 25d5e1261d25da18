"""Character clusters over CCIP features, at the scale of an anime season (tens of thousands of crops).

No n×n matrix is ever held: crops are clustered in chunks (an episode, or a slice of at most
``chunk`` crops) with HDBSCAN over that chunk's differences; each chunk cluster becomes a centroid
(``centroid``: the mean of L2-normalised features at their mean length); the crops no chunk
clustered are pooled and clustered once more, by DBSCAN at the model's threshold (a minor
character has too few crops in any one episode); then clusters whose centroids are close merge
when enough of their cross pairs are the same character (the reference's hygiene: ``merge_ratio``
0.85), and a leftover crop joins its nearest cluster when ``join_ratio`` (0.90) of that cluster's
members judge it the same. Members are sampled for those checks, so their cost does not grow with
cluster size.

``difference(a, b)`` gives the [len(a), len(b)] CCIP differences (``vision.ccip.differences``
with the model bound); same character means difference ≤ ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

Difference = Callable[[np.ndarray, np.ndarray], np.ndarray]

CHUNK = 2000  # crops clustered together at most (a 2,000² float64 matrix is 32 MB)
MIN_CLUSTER = 5
MERGE_RATIO, JOIN_RATIO = 0.85, 0.90
SAMPLE = 32  # members compared per cluster in the merge and join checks
DENSE_CORE = 3  # DBSCAN's min_samples (the point itself included) in the pooled pass
NEAR = 2.0  # centroid pairs further apart than NEAR × threshold are never compared member by member


@dataclass
class CharacterClusters:
    labels: np.ndarray  # per crop: 0, 1, … by decreasing size; -1 = noise
    sizes: list[int] = field(default_factory=list)  # crops per label


def centroid(features: np.ndarray) -> np.ndarray:
    """The features' mean direction at their mean length (a cluster usable as one feature)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    mean = unit.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12) * float(norms.mean())


def _chunks(count: int, groups: Sequence[int] | None, chunk: int) -> list[np.ndarray]:
    """Indices clustered together: each group (an episode) cut into slices of at most ``chunk``."""
    keys = np.zeros(count, dtype=np.int64) if groups is None else np.asarray(groups)
    out = []
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        out += [members[start : start + chunk] for start in range(0, len(members), chunk)]
    return out


def _cluster_chunk(
    features: np.ndarray, difference: Difference, threshold: float, min_cluster: int, dense: bool = False
) -> np.ndarray:
    """HDBSCAN labels for one chunk (``dense``: DBSCAN at the model's threshold, which, unlike HDBSCAN,
    finds a chunk's only character, as pooled leftovers often hold). A member that is the same
    character as fewer than half of the rest of its cluster becomes noise, for the pooled pass and
    the join check (HDBSCAN keeps outliers in a cluster's tree, and may join two characters too
    small to be clusters of their own); so does what is left of a cluster below ``min_cluster``."""
    from sklearn.cluster import DBSCAN, HDBSCAN

    if len(features) < min_cluster:
        return np.full(len(features), -1)
    matrix = np.asarray(difference(features, features), dtype=np.float64)
    matrix = (matrix + matrix.T) / 2  # float rounding leaves the model's matrix slightly asymmetric
    np.fill_diagonal(matrix, 0.0)
    if dense:
        labels = DBSCAN(eps=threshold, min_samples=DENSE_CORE, metric="precomputed").fit(matrix).labels_
    else:
        labels = HDBSCAN(min_cluster_size=min_cluster, metric="precomputed", copy=True).fit(matrix).labels_
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        others = (matrix[np.ix_(members, members)] <= threshold).sum(axis=1) - 1  # not counting itself
        labels[members[others < 0.5 * (len(members) - 1)]] = -1
        if (labels == label).sum() < min_cluster:
            labels[labels == label] = -1
    return labels


class _Groups:
    """Union-find over chunk clusters, with a member sample per group."""

    def __init__(self, members: list[np.ndarray], rng: np.random.Generator, sample: int) -> None:
        self.parent = list(range(len(members)))
        self.members, self.rng, self.sample = members, rng, sample

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.members[a] = np.concatenate([self.members[a], self.members[b]])

    def picked(self, i: int) -> np.ndarray:
        group = self.members[self.find(i)]
        return group if len(group) <= self.sample else self.rng.choice(group, self.sample, replace=False)


def cluster_characters(
    features: np.ndarray,
    difference: Difference,
    threshold: float,
    groups: Sequence[int] | None = None,
    chunk: int = CHUNK,
    min_cluster: int = MIN_CLUSTER,
    merge_ratio: float = MERGE_RATIO,
    join_ratio: float = JOIN_RATIO,
    sample: int = SAMPLE,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> CharacterClusters:
    """Cluster crops by character; ``groups`` (e.g. the episode of each crop) keeps chunks apart."""
    features = np.asarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    chunks = _chunks(len(features), groups, chunk)
    members, noise = _cluster_chunks(features, chunks, difference, threshold, min_cluster, on_chunk)
    pool = np.concatenate(noise) if noise else np.zeros(0, dtype=np.int64)
    # a character with too few crops in any one chunk gathers in the pooled leftovers
    pooled = [pool[start : start + chunk] for start in range(0, len(pool), chunk)]
    more, noise = _cluster_chunks(features, pooled, difference, threshold, min_cluster, dense=True)
    members += more
    clusters = _Groups(members, rng, sample)
    _merge(features, clusters, difference, threshold, merge_ratio)
    roots = sorted({clusters.find(i) for i in range(len(members))}, key=lambda r: -len(clusters.members[r]))
    labels = np.full(len(features), -1, dtype=np.int64)
    for label, root in enumerate(roots):
        labels[clusters.members[root]] = label
    leftovers = np.concatenate(noise) if noise else np.zeros(0, dtype=np.int64)
    _join(features, labels, leftovers, [clusters.picked(r) for r in roots], difference, threshold, join_ratio)
    sizes = np.bincount(labels[labels >= 0], minlength=len(roots)).tolist()
    order = np.argsort(sizes, kind="stable")[::-1]  # joins may change the order of sizes
    relabel = np.full(len(roots) + 1, -1, dtype=np.int64)
    relabel[order] = np.arange(len(roots))
    labels = relabel[labels]  # -1 indexes the last slot, which stays -1
    return CharacterClusters(labels, [sizes[i] for i in order])


def _cluster_chunks(
    features: np.ndarray,
    chunks: list[np.ndarray],
    difference: Difference,
    threshold: float,
    min_cluster: int,
    on_chunk: Callable[[int], None] | None = None,
    dense: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each chunk clustered on its own: the clusters' members, and each chunk's noise."""
    members: list[np.ndarray] = []
    noise: list[np.ndarray] = []
    for indices in chunks:
        labels = _cluster_chunk(features[indices], difference, threshold, min_cluster, dense)
        members += [indices[labels == label] for label in np.unique(labels) if label >= 0]
        noise.append(indices[labels < 0])
        if on_chunk:
            on_chunk(len(indices))
    return members, noise


def same_share(a: np.ndarray, b: np.ndarray, difference: Difference, threshold: float) -> float:
    """The share of (a, b) feature pairs judged the same character."""
    return float((np.asarray(difference(a, b)) <= threshold).mean())


def _merge(features, clusters: _Groups, difference: Difference, threshold: float, ratio: float) -> None:
    """Merge chunk clusters of one character, closest centroids first."""
    if len(clusters.members) < 2:
        return
    centres = np.stack([centroid(features[m]) for m in clusters.members])
    near = np.asarray(difference(centres, centres))
    pairs = [(near[i, j], i, j) for i, j in zip(*np.triu_indices(len(centres), k=1)) if near[i, j] <= NEAR * threshold]
    for _, i, j in sorted(pairs):
        if clusters.find(i) == clusters.find(j):
            continue
        if same_share(features[clusters.picked(i)], features[clusters.picked(j)], difference, threshold) >= ratio:
            clusters.union(i, j)


def _join(features, labels, leftovers, samples, difference: Difference, threshold: float, ratio: float) -> None:
    """A leftover crop joins the cluster nearest to it when ``ratio`` of that cluster's sample agrees."""
    if not len(leftovers) or not samples:
        return
    centres = np.stack([centroid(features[s]) for s in samples])
    for start in range(0, len(leftovers), CHUNK):
        batch = leftovers[start : start + CHUNK]
        nearest = np.asarray(difference(features[batch], centres)).argmin(axis=1)
        for label in np.unique(nearest):
            crops = batch[nearest == label]
            agree = (np.asarray(difference(features[crops], features[samples[label]])) <= threshold).mean(axis=1)
            labels[crops[agree >= ratio]] = label
