"""Training examples: captions with the trigger first, bucketed images and their cached latents."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from lorafactory.train import buckets

log = logging.getLogger(__name__)


@dataclass
class Example:
    file: str
    tags: list[str]
    bucket: tuple[int, int]
    latent: torch.Tensor  # [4, h/8, w/8], already multiplied by the VAE scaling factor


def build_caption(trigger: str, tags: list[str], rng: random.Random, shuffle: bool, tag_dropout: float, caption_dropout: float) -> str:
    """Trigger first (never shuffled or dropped by tag dropout), then the tags."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    rest = [tag for tag in tags if not (tag_dropout and rng.random() < tag_dropout)]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join([trigger] + rest)


def read_metadata(dataset_dir: Path) -> list[dict]:
    with (dataset_dir / "metadata.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def load_examples(
    dataset_dir: Path,
    vae: torch.nn.Module,
    resolution: int,
    step: int,
    device: torch.device,
    on_item: Callable[[], None] | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Bucket every dataset image and encode it once with the VAE (latents cached in memory).

    Identical images share one latent (keyed by content hash and bucket).
    """
    cache: dict[str, torch.Tensor] = {}
    examples: list[Example] = []
    counts = {"unreadable": 0, "too_small": 0}
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    for record in read_metadata(dataset_dir):
        if on_item:
            on_item()
        path = dataset_dir / record["file"]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            log.warning("skipping unreadable training image %s: %s", record["file"], exc)
            counts["unreadable"] += 1
            continue
        placement = buckets.fit(image.width, image.height, resolution, step)
        if placement is None:
            counts["too_small"] += 1
            continue
        pixels = buckets.apply(image, placement)
        key = hashlib.sha256(pixels.tobytes()).hexdigest() + f"{placement.bucket}"
        if key not in cache:
            with torch.no_grad():
                batch = _to_tensor(pixels).unsqueeze(0).to(device, dtype=vae.dtype)
                cache[key] = (vae.encode(batch).latent_dist.mean[0] * scale).float().cpu()
        examples.append(Example(record["file"], list(record.get("tags", [])), placement.bucket, cache[key]))
    return examples, counts


def batch_plan(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: indices shuffled within each bucket, then the batch order shuffled."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, example in enumerate(examples):
        by_bucket.setdefault(example.bucket, []).append(index)
    plan = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket][:]
        rng.shuffle(indices)
        plan += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(plan)
    return plan
