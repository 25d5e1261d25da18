"""The whole flow for one show: extract new episodes, cluster, name, write the characters."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lorafactory.config import Settings, to_toml
from lorafactory.dataset.naming import Overrides, apply_overrides, name_clusters, read_overrides
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.show.crops import cluster_show, load_crops
from lorafactory.show.datasets import write_characters
from lorafactory.show.layout import show_dir
from lorafactory.show.references import candidates, reference_features
from lorafactory.sources.anime import VIDEO_SUFFIXES, Extraction, episode_files, extract_episodes
from lorafactory.vision.ccip import default_threshold, differences
from lorafactory.workspace import Workspace, write_bytes_atomic, write_json_atomic

SAMPLE = 64  # crops per cluster compared with the references


@dataclass
class ShowResult:
    extraction: Extraction | None
    manifest: dict


def _sample(features: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    members = np.flatnonzero(labels == label)
    if len(members) > SAMPLE:
        members = np.random.default_rng(label).choice(members, SAMPLE, replace=False)
    return features[members]


def build_show(
    workspace: Workspace,
    store,
    settings: Settings,
    show_name: str,
    progress: Progress,
    episodes: Path | None = None,
    copyright: str | None = None,
    cast: list[str] | None = None,
    site: str = "danbooru",
) -> ShowResult:
    """Extract the episodes under ``episodes`` not yet extracted, then cluster, name and write each named
    character's dataset and settings; without ``episodes``, rebuild from what was extracted (after
    editing names.toml, say)."""
    show = show_dir(workspace, show_name)
    show.root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(show.config_path, to_toml(settings).encode("utf-8"))
    extraction = None
    if episodes is not None:
        if not Path(episodes).is_dir():
            raise InputError(f"episode folder {episodes} does not exist; pass the folder of the show's video files")
        if not episode_files(Path(episodes)):
            raise InputError(
                f"no video files in {episodes} ({', '.join(sorted(VIDEO_SUFFIXES))}); pass the folder of the episodes"
            )
        extraction = extract_episodes(Path(episodes), show.episodes, settings, progress)
    crops = load_crops(show, settings)
    clustering, labels = cluster_show(show, crops, settings, progress)
    count = int(labels.max()) + 1 if len(labels) else 0
    names = candidates(settings, show, copyright, list(cast or []), site)
    references = {}
    with progress.task("reference sets", total=len(names)) as task:
        for candidate in names:
            found = reference_features(workspace, store, settings, candidate, site, show, progress)
            if len(found):
                references[candidate.name] = found
            task.advance()
    model, a = settings.vision.ccip_model, settings.anime
    named = name_clusters(
        [_sample(crops.features, labels, label) for label in range(count)],
        references,
        partial(differences, model_name=model),
        default_threshold(model),
        a.accept,
        a.margin,
    )
    overrides = read_overrides(show.names_path) if show.names_path.is_file() else Overrides({})
    clusters = [
        {
            "cluster": c.cluster,
            "crops": int((labels == c.cluster).sum()),
            "episodes": int(len(np.unique(crops.episode[labels == c.cluster]))),
            "name": c.name,
            "score": round(c.score, 3),
            "runner_up": round(c.runner_up, 3),
            "named_by": source,
            "sheet": str(show.contact / f"cluster_{c.cluster}.png"),
        }
        for c, source in apply_overrides(named, overrides, clustering, show.names_path)
    ]
    characters = write_characters(workspace, store, settings, show, crops, labels, clusters, copyright, progress)
    manifest = {
        "show": show_name,
        "clustering": clustering,
        "episodes": crops.episodes,
        "skipped": extraction.skipped if extraction else {},
        "counts": {
            **dict(crops.counts),
            "clusters": count,
            "noise": int((labels < 0).sum()),
            "datasets": sum(1 for c in characters if c["dataset"]),
        },
        "candidates": [c.name for c in names],
        "references": {name: len(found) for name, found in references.items()},
        "clusters": clusters,
        "characters": characters,
    }
    write_json_atomic(show.manifest_path, manifest)
    return ShowResult(extraction, manifest)
