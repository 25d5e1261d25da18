"""Character crops from a folder of anime episodes, one episode at a time.

Each episode's frames are sampled per shot (``sources.episodes``). A frame that nearly repeats an
earlier one of its episode is skipped. Every person detected in a frame becomes a crop when both
its sides are at least ``prepare.min_crop_side``, it has exactly one head, it is not monochrome,
and imgutils' bangumi_char model does not class it as ``vision`` (a background character drawn
without detail); each rejection is counted. Crops are saved with their CCIP features, and every
sampled frame's signature is kept for finding openings and endings across episodes
(``sources.recurring``); a random few frames are kept whole, for regularization sets.

An episode is the unit of work: its ``done.json`` is written last, so an interrupted extraction
resumes at the first unfinished episode, and an episode that cannot be decoded is reported and
skipped (tried again on the next run), never fatal.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lorafactory.config import Settings
from lorafactory.progress import Progress
from lorafactory.sources.episodes import EpisodeError, Sampling, sample_frames
from lorafactory.sources.recurring import rms_distances, signature
from lorafactory.vision.ccip import extract_features
from lorafactory.vision.classify import bangumi_char_class, monochrome_score
from lorafactory.vision.detect import Box, detect
from lorafactory.workspace import write_bytes_atomic, write_json_atomic

VIDEO_SUFFIXES = {".mkv", ".mp4", ".webm", ".avi", ".mov", ".m2ts", ".ts"}
DONE, FEATURES, CROPS, FRAMES, KEPT = "done.json", "features.npy", "crops.jsonl", "frames.npz", "frames"


@dataclass
class Extraction:
    done: list[str] = field(default_factory=list)  # episodes extracted by this run
    resumed: list[str] = field(default_factory=list)  # episodes a previous run had finished
    skipped: dict[str, str] = field(default_factory=dict)  # episode -> why it could not be read


def episode_files(folder: Path) -> list[Path]:
    """The video files in ``folder`` (and below), in name order: the episodes' order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def character_crops(
    image: Image.Image, settings: Settings, counts: Counter, low_detail: bool
) -> list[tuple[Box, Image.Image]]:
    """The usable one-character crops of a picture and their boxes; ``counts`` gains a count per
    reason a crop was dropped."""
    p, v = settings.prepare, settings.vision
    crops = []
    for box in detect(image, "person", v.person_model):
        counts["persons"] += 1
        crop = image.crop((box.x0, box.y0, box.x1, box.y1))
        if min(crop.size) < p.min_crop_side:
            counts["too_small"] += 1
        elif len(detect(crop, "head", v.head_model)) != 1:
            counts["not_one_head"] += 1
        elif monochrome_score(crop, v.monochrome_model) >= p.monochrome_threshold:
            counts["monochrome"] += 1
        elif low_detail and bangumi_char_class(crop, v.bangumi_model)[0] == "vision":
            counts["low_detail"] += 1
        else:
            crops.append((box, crop))
    return crops


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


class _Signatures:
    """The signatures of an episode's frames so far, for near-duplicate checks."""

    def __init__(self) -> None:
        self.rows = np.zeros((1024, 144), dtype=np.uint8)
        self.count = 0

    def near(self, sig: np.ndarray, distance: float) -> bool:
        return bool(self.count) and bool((rms_distances(sig[None], self.rows[: self.count]) <= distance).any())

    def add(self, sig: np.ndarray) -> None:
        if self.count == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.count] = sig
        self.count += 1


class _KeptFrames:
    """A uniform random sample of ``size`` frames (reservoir sampling), saved as they are chosen."""

    def __init__(self, folder: Path, size: int, seed: str) -> None:
        self.folder, self.size, self.rng, self.seen = folder, size, random.Random(seed), 0
        self.slots: list[Path] = []

    def offer(self, index: int, image: Image.Image) -> None:
        slot = len(self.slots) if len(self.slots) < self.size else self.rng.randrange(self.seen + 1)
        self.seen += 1
        if slot >= self.size:
            return
        path = self.folder / f"{index:06d}.jpg"
        image.convert("RGB").save(path, quality=92)
        if slot == len(self.slots):
            self.slots.append(path)
        else:
            self.slots[slot].unlink()
            self.slots[slot] = path


def _extract_episode(path: Path, folder: Path, settings: Settings, progress: Progress) -> None:
    a = settings.anime
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished episode starts over
    (folder / KEPT).mkdir(parents=True)
    counts: Counter = Counter()
    records, images, frames, signatures = [], [], [], []
    seen, kept = _Signatures(), _KeptFrames(folder / KEPT, a.keep_frames, path.stem)
    sampling = Sampling(per_shot=a.frames_per_shot, gap_s=a.frame_gap_s)
    with progress.task(f"{path.stem}: frames", total=None) as task:
        for frame in sample_frames(path, sampling):
            task.advance()
            counts["frames"] += 1
            sig = signature(frame.image)
            frames.append((frame.index, frame.time, frame.shot))
            signatures.append(sig)
            if seen.near(sig, a.duplicate_distance):
                counts["near_duplicate"] += 1
                continue
            seen.add(sig)
            kept.offer(frame.index, frame.image)
            for number, (box, crop) in enumerate(character_crops(frame.image, settings, counts, a.drop_low_detail)):
                name = f"{frame.index:06d}_{number}.png"
                crop.save(folder / name)
                where = {"time": round(frame.time, 3), "shot": frame.shot, "frame": frame.index}
                records.append({"file": name, **where, "box": [box.x0, box.y0, box.x1, box.y1]})
                images.append(crop)
    counts["crops"] = len(records)
    np.save(folder / FEATURES, extract_features(images, settings.vision.ccip_model))
    table = np.array(frames, dtype=np.float64).reshape(-1, 3)
    np.savez(
        folder / FRAMES,
        index=table[:, 0].astype(np.int64),
        time=table[:, 1],
        shot=table[:, 2].astype(np.int64),
        signature=np.array(signatures, dtype=np.uint8).reshape(-1, 144),
    )
    write_bytes_atomic(folder / CROPS, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    write_json_atomic(folder / DONE, {"episode": path.name, "counts": dict(counts)})
