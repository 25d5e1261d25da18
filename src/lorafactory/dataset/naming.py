"""Names for character clusters, from small reference sets of candidate characters.

A cluster's score for a candidate is the share of (crop, reference image) pairs CCIP judges the
same character. Clusters and candidates are matched one-to-one by the best total score (the
assignment problem); a cluster left over may still take a name already given when it scores as
well (one character's clusters in two outfits). A name is given only when its score reaches
``accept`` and beats the runner-up by ``margin``: an unnamed cluster is better than a wrong name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lorafactory.config import tomllib
from lorafactory.dataset.characters import Difference, same_share
from lorafactory.errors import InputError

ACCEPT, MARGIN = 0.6, 0.2


@dataclass(frozen=True)
class ClusterName:
    cluster: int
    name: str | None  # None: unknown
    score: float  # the share of pairs judged the same character, for the best candidate
    runner_up: float  # the same for the second best (0 when there is only one candidate)


def scores(
    clusters: Sequence[np.ndarray], references: Mapping[str, np.ndarray], difference: Difference, threshold: float
) -> np.ndarray:
    """[clusters, candidates] share of crop × reference pairs whose difference is ≤ ``threshold``."""
    table = np.zeros((len(clusters), len(references)))
    for j, features in enumerate(references.values()):
        for i, crops in enumerate(clusters):
            table[i, j] = same_share(crops, features, difference, threshold)
    return table


def name_clusters(
    clusters: Sequence[np.ndarray],
    references: Mapping[str, np.ndarray],
    difference: Difference,
    threshold: float,
    accept: float = ACCEPT,
    margin: float = MARGIN,
) -> list[ClusterName]:
    """A name (or None) for each cluster, given as the features of a sample of its crops."""
    from scipy.optimize import linear_sum_assignment

    names = list(references)
    if not names or not clusters:
        return [ClusterName(i, None, 0.0, 0.0) for i in range(len(clusters))]
    table = scores(clusters, references, difference, threshold)
    ranked = np.sort(table, axis=1)[:, ::-1]
    best, second = ranked[:, 0], (ranked[:, 1] if len(names) > 1 else np.zeros(len(clusters)))
    confident = (best >= accept) & (best - second >= margin)
    chosen: dict[int, str] = {}
    rows, cols = linear_sum_assignment(-table)
    for i, j in zip(rows, cols):
        if confident[i] and table[i, j] == best[i]:
            chosen[i] = names[j]
    for i in np.flatnonzero(confident):  # another cluster of a character already named
        if i not in chosen and names[int(table[i].argmax())] in chosen.values():
            chosen[int(i)] = names[int(table[i].argmax())]
    return [ClusterName(i, chosen.get(i), float(best[i]), float(second[i])) for i in range(len(clusters))]


@dataclass(frozen=True)
class Overrides:
    """A user's corrections, from a TOML file: ``[clusters]`` maps a cluster id to a name (two clusters
    given one name merge into one character) or to ``false``/``""`` (no name: dropped); an optional
    ``clustering`` key pins the clusters the file was written for."""

    names: dict[int, str | None]
    clustering: str | None = None


def read_overrides(path: Path) -> Overrides:
    """Parse and check an overrides file; a mistake is an ``InputError`` naming the fix."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix the line it names") from exc
    unknown = set(data) - {"clusters", "clustering"}
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; use [clusters] and clustering")
    names: dict[int, str | None] = {}
    for key, value in data.get("clusters", {}).items():
        if not str(key).isdigit():
            raise InputError(f"{path}: cluster {key!r} is not a cluster number; use the numbers `--list` shows")
        if value is False or value == "":
            names[int(key)] = None
        elif isinstance(value, str) and value.strip():
            names[int(key)] = value.strip()
        else:
            raise InputError(f"{path}: cluster {key} = {value!r}; give a name in quotes, or false to drop it")
    clustering = data.get("clustering")
    return Overrides(names, str(clustering) if clustering is not None else None)


def apply_overrides(
    named: list[ClusterName], overrides: Overrides, clustering: str, path: Path
) -> list[tuple[ClusterName, str]]:
    """Each cluster's final name with where it came from (``auto`` or ``names``)."""
    if overrides.clustering is not None and overrides.clustering != clustering:
        raise InputError(
            f"{path} was written for clusters {overrides.clustering}, but the clusters are now {clustering} "
            "(episodes changed); check `lorafactory anime SHOW --list` and update the file"
        )
    missing = sorted(set(overrides.names) - {c.cluster for c in named})
    if missing:
        raise InputError(
            f"{path}: no cluster {', '.join(map(str, missing))} "
            f"({f'clusters are 0–{len(named) - 1}' if named else 'there are no clusters'}); "
            "see `lorafactory anime SHOW --list`"
        )
    out = []
    for cluster in named:
        if cluster.cluster in overrides.names:
            out.append((replace(cluster, name=overrides.names[cluster.cluster]), "names"))
        else:
            out.append((cluster, "auto"))
    return out
