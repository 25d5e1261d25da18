"""Character crops from a folder of anime episodes, one episode at a time.

Each episode's frames are sampled per shot (``sources.episodes``); every person detected in a frame
with exactly one head and both sides at least ``prepare.min_crop_side`` becomes a crop, saved with
its CCIP features. An episode is the unit of work: its ``done.json`` is written last, so an
interrupted extraction resumes at the first unfinished episode, and an episode that cannot be
decoded is reported and skipped (tried again on the next run), never fatal.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafactory.config import Settings
from lorafactory.dataset.crops import head_count, person_crops
from lorafactory.progress import Progress
from lorafactory.sources.episodes import EpisodeError, Sampling, sample_frames
from lorafactory.vision.ccip import extract_features
from lorafactory.workspace import write_bytes_atomic, write_json_atomic

VIDEO_SUFFIXES = {".mkv", ".mp4", ".webm", ".avi", ".mov", ".m2ts", ".ts"}
DONE, FEATURES, CROPS = "done.json", "features.npy", "crops.jsonl"


@dataclass
class Extraction:
    done: list[str] = field(default_factory=list)  # episodes extracted by this run
    resumed: list[str] = field(default_factory=list)  # episodes a previous run had finished
    skipped: dict[str, str] = field(default_factory=dict)  # episode -> why it could not be read


def episode_files(folder: Path) -> list[Path]:
    """The video files in ``folder`` (and below), in name order: the episodes' order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def extract_episodes(episodes: Path, out_dir: Path, settings: Settings, progress: Progress) -> Extraction:
    """Crops and their CCIP features for every episode under ``episodes``, into ``out_dir/<episode>/``."""
    result = Extraction()
    files = episode_files(episodes)
    with progress.task("episodes", total=len(files)) as overall:
        for path in files:
            folder = out_dir / path.stem
            if (folder / DONE).is_file():
                result.resumed.append(path.stem)
            else:
                try:
                    _extract_episode(path, folder, settings, progress)
                    result.done.append(path.stem)
                except EpisodeError as exc:
                    progress.note(f"[yellow]{exc}[/yellow]")
                    result.skipped[path.stem] = str(exc)
            overall.advance()
    return result


def _extract_episode(path: Path, folder: Path, settings: Settings, progress: Progress) -> None:
    p, v = settings.prepare, settings.vision
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished episode starts over
    folder.mkdir(parents=True)
    records, images = [], []
    with progress.task(f"{path.stem}: frames", total=None) as task:
        for frame in sample_frames(path, Sampling()):
            for number, crop in enumerate(person_crops(frame.image, p, v)):
                if head_count(crop, v) != 1:
                    continue
                name = f"{frame.index:06d}_{number}.png"
                crop.image.save(folder / name)
                records.append({"file": name, "time": round(frame.time, 3), "shot": frame.shot, "frame": frame.index})
                images.append(crop.image)
            task.advance()
    features = extract_features(images, v.ccip_model) if images else np.zeros((0, 768), dtype=np.float32)
    np.save(folder / FEATURES, features)
    write_bytes_atomic(folder / CROPS, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    write_json_atomic(folder / DONE, {"episode": path.name, "crops": len(records)})
