"""A show's crops, all episodes together, and their character clusters."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from lorafactory.config import Settings
from lorafactory.dataset.characters import cluster_characters
from lorafactory.dataset.contact import contact_sheet
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.show.layout import ShowDir
from lorafactory.sources.anime import CROPS, DONE, FEATURES, FRAMES, KEPT
from lorafactory.sources.recurring import recurring_frames, recurring_shots
from lorafactory.vision.ccip import FEATURE_DIM, default_threshold, differences
from lorafactory.workspace import write_json_atomic

SHEET = 24  # crops per contact sheet


@dataclass
class ShowCrops:
    """Every usable crop of the show (recurring shots removed), with its features."""

    episodes: list[str]
    files: list[Path] = field(default_factory=list)
    episode: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # episode number per crop
    frame: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # frame number in its episode
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, FEATURE_DIM), np.float32))
    counts: Counter = field(default_factory=Counter)  # per filter, all episodes together
    # the frames kept whole (for regularization) outside recurring shots: (episode number, frame number, file)
    whole_frames: list[tuple[int, int, Path]] = field(default_factory=list)


def load_crops(show: ShowDir, settings: Settings) -> ShowCrops:
    """The extracted episodes' crops, without those of shots that recur across episodes."""
    a = settings.anime
    folders = sorted(d for d in show.episodes.iterdir() if (d / DONE).is_file()) if show.episodes.is_dir() else []
    if not folders:
        raise InputError(f"no episodes extracted in {show.episodes}; pass --episodes DIR (the show's video files)")
    frames = {d.name: np.load(d / FRAMES) for d in folders}
    recurring = recurring_frames(
        {name: table["signature"] for name, table in frames.items()}, a.recurring_episodes, a.recurring_distance
    )
    out = ShowCrops([d.name for d in folders])
    episode, frame, features = [], [], []
    for number, folder in enumerate(folders):
        out.counts.update(json.loads((folder / DONE).read_text())["counts"])
        table = frames[folder.name]
        shots = table["shot"]
        dropped = recurring_shots(shots, recurring[folder.name])
        shot_of = dict(zip(table["index"].tolist(), shots.tolist()))
        for path in sorted((folder / KEPT).glob("*.jpg")):
            if shot_of.get(int(path.stem)) not in dropped:
                out.whole_frames.append((number, int(path.stem), path))
        records = [json.loads(line) for line in (folder / CROPS).read_text().splitlines() if line.strip()]
        keep = [i for i, r in enumerate(records) if r["shot"] not in dropped]
        out.counts["recurring"] += len(records) - len(keep)
        out.counts["recurring_shots"] += len(dropped)
        out.files += [folder / records[i]["file"] for i in keep]
        episode += [number] * len(keep)
        frame += [records[i]["frame"] for i in keep]
        features.append(np.load(folder / FEATURES)[keep])
    out.episode, out.frame = np.array(episode, np.int64), np.array(frame, np.int64)
    out.features = np.concatenate(features).astype(np.float32)
    out.counts["usable"] = len(out.files)
    return out


def clustering_key(show: ShowDir, crops: ShowCrops, settings: Settings) -> str:
    """Names the clustering: the extracted episodes and the settings the clusters depend on."""
    digest = hashlib.sha256()
    for name in crops.episodes:
        digest.update(name.encode() + (show.episodes / name / DONE).read_bytes())
    a = settings.anime
    digest.update(
        json.dumps([a.min_cluster, a.recurring_episodes, a.recurring_distance, settings.vision.ccip_model]).encode()
    )
    return digest.hexdigest()[:12]


def cluster_show(show: ShowDir, crops: ShowCrops, settings: Settings, progress: Progress) -> tuple[str, np.ndarray]:
    """(clustering id, label per crop: 0, 1, … by size, -1 noise), computed once per set of episodes."""
    key = clustering_key(show, crops, settings)
    saved = show.root / "clusters.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        if data.get("clustering") == key:
            return key, np.array(data["labels"], dtype=np.int64)
    model = settings.vision.ccip_model
    with progress.task(f"clustering {len(crops.files)} crops", total=len(crops.files)) as task:
        result = cluster_characters(
            crops.features,
            partial(differences, model_name=model),
            default_threshold(model),
            groups=crops.episode,
            min_cluster=settings.anime.min_cluster,
            on_chunk=task.advance,
        )
    _contact_sheets(show, crops, result.labels)
    write_json_atomic(saved, {"clustering": key, "labels": result.labels.tolist()})
    return key, result.labels


def spread(indices: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``indices``, evenly spaced (so every episode is represented)."""
    if len(indices) <= count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, count).round().astype(np.int64)]


def _contact_sheets(show: ShowDir, crops: ShowCrops, labels: np.ndarray) -> None:
    shutil.rmtree(show.contact, ignore_errors=True)
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        members = spread(np.flatnonzero(labels == label), SHEET)
        contact_sheet([crops.files[i] for i in members], show.contact / f"cluster_{label}.png")
