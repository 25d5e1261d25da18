"""Named characters' datasets and regularization sets from a show's clusters, and their settings.

A character's dataset is her clusters' crops, spread evenly over the show up to ``crawl.limit``;
her regularization set is kept frames of the show in which she does not appear (openings and
endings excluded). Both are folders of hard links named by a digest of their content, so a
changed dataset (a name corrected in names.toml) reaches her pipeline as changed settings.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from lorafactory.config import Settings, load_settings, read_toml, to_toml
from lorafactory.progress import Progress
from lorafactory.show.crops import ShowCrops, spread
from lorafactory.show.layout import ShowDir, link_or_copy
from lorafactory.sources.danbooru import character_tag
from lorafactory.workspace import Workspace, slugify, write_bytes_atomic


def _folder(parent: Path, slug: str, files: list[tuple[Path, str]]) -> Path:
    """``parent/<slug>-<digest>`` holding ``files`` (source, name) as hard links; built once."""
    digest = hashlib.sha256("\n".join(name for _, name in files).encode()).hexdigest()[:10]
    folder = parent / f"{slug}-{digest}"
    if not folder.is_dir():
        partial = parent / f"{slug}-{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for source, name in files:
            link_or_copy(source, partial / name)
        partial.rename(folder)
    return folder


def _free_frames(crops: ShowCrops, members: np.ndarray) -> list[tuple[Path, str]]:
    """Kept frames without any crop of hers, outside recurring shots."""
    hers = set(zip(crops.episode[members].tolist(), crops.frame[members].tolist()))
    return [
        (path, f"{crops.episodes[episode]}_{path.name}")
        for episode, index, path in crops.whole_frames
        if (episode, index) not in hers
    ]


def write_characters(
    workspace: Workspace,
    store,
    settings: Settings,
    show: ShowDir,
    crops: ShowCrops,
    labels: np.ndarray,
    clusters: list[dict],
    copyright: str | None,
    progress: Progress,
) -> list[dict]:
    """Datasets, regularization sets and workspace settings of the named characters; their summaries."""
    from lorafactory.pipeline import trigger_for

    by_name: dict[str, list[int]] = {}
    for cluster in clusters:
        if cluster["name"]:
            by_name.setdefault(cluster["name"], []).append(cluster["cluster"])
    characters, used = [], set()
    for name, ids in by_name.items():
        members = np.flatnonzero(np.isin(labels, ids))
        entry = {"name": name, "slug": slugify(name), "clusters": ids, "crops": len(members)}
        if len(members) < settings.anime.min_crops:
            entry["dataset"] = None
            entry["reason"] = f"{len(members)} crops, fewer than anime.min_crops ({settings.anime.min_crops})"
            characters.append(entry)
            continue
        chosen = spread(members, settings.crawl.limit)
        files = [(crops.files[i], f"{crops.episodes[crops.episode[i]]}_{crops.files[i].name}") for i in chosen]
        dataset = _folder(show.root / "datasets", entry["slug"], files)
        frames = _spread_frames(_free_frames(crops, members), settings)
        char = workspace.character(entry["slug"])
        character = _settings_of(char.config_path, settings)
        character.character.name = name
        character.crawl.source, character.crawl.from_dir = "anime", str(dataset)
        used.add(dataset)
        regularization = None
        if frames:
            regularization = _folder(show.root / "regularization", entry["slug"], frames)
            character.regularization.mode, character.regularization.from_dir = "on", str(regularization)
            used.add(regularization)
        elif Path(character.regularization.from_dir or "/").is_relative_to(show.root):  # an older set of ours
            character.regularization.mode, character.regularization.from_dir = "auto", ""
        char.path.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(char.config_path, to_toml(character).encode("utf-8"))
        if store is not None:
            store.ensure_character(entry["slug"], name, trigger_for(character), copyright and character_tag(copyright))
        entry.update(dataset=str(dataset), images=len(files), frames=len(frames))
        entry["regularization"] = str(regularization) if regularization else None
        characters.append(entry)
        progress.note(f"{name}: {len(files)} crops from cluster(s) {', '.join(map(str, ids))}")
    for parent in (show.root / "datasets", show.root / "regularization"):  # what no name uses any more
        for folder in parent.glob("*") if parent.is_dir() else []:
            if folder not in used:
                shutil.rmtree(folder, ignore_errors=True)
    return characters


def _settings_of(saved: Path, show_settings: Settings) -> Settings:
    """Her saved settings when she has some (a user's changes to them are kept), else the show's."""
    if saved.is_file():
        return load_settings(base=read_toml(saved))
    return show_settings.model_copy(deep=True)


def _spread_frames(frames: list[tuple[Path, str]], settings: Settings) -> list[tuple[Path, str]]:
    """At most ``regularization.limit`` frames, evenly spread."""
    return [frames[i] for i in spread(np.arange(len(frames)), settings.regularization.limit)]
