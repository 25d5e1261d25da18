"""Training examples: captions with the trigger first, bucketed images and their cached latents."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lorafactory.train import buckets

log = logging.getLogger(__name__)


@dataclass
class Example:
    file: str
    group: str
    source: str  # the raw image the crop came from; held-out sets never share one with training
    tags: list[str]
    bucket: tuple[int, int]  # (width, height)
    latent: torch.Tensor | None  # [4, h/8, w/8] times the VAE scaling factor; None when latents are not cached
    original_size: tuple[int, int]  # (height, width) before bucketing, for SDXL's size conditioning
    crop: tuple[int, int]  # (top, left) of the bucket crop in the resized image
    flipped: torch.Tensor | None = None
    pixels: torch.Tensor | None = None  # [3, h, w] in -1..1, kept instead of the latent when caching is off
    regularization: bool = False  # a generic image: no trigger in its caption, its own loss weight


RESIDENT_LATENT_BYTES = 4 * 2**30  # cached latents up to this size live on the training device


def make_resident(examples: list[Example], device: torch.device, budget: int = RESIDENT_LATENT_BYTES) -> bool:
    """Move the cached latents (and their flips) onto ``device`` when they fit ``budget`` bytes, so a step
    copies nothing from the host; True when moved. 512 px latents take 64 KiB an image, 1024 px 256 KiB."""
    tensors = [t for ex in examples for t in (ex.latent, ex.flipped) if t is not None]
    if not tensors or sum(t.numel() * t.element_size() for t in tensors) > budget:
        return False
    for ex in examples:
        ex.latent = None if ex.latent is None else ex.latent.to(device)
        ex.flipped = None if ex.flipped is None else ex.flipped.to(device)
    return True


def build_caption(
    trigger: str | None,
    tags: list[str],
    rng: random.Random,
    shuffle: bool,
    tag_dropout: float,
    caption_dropout: float,
    keep_tokens: int = 0,
) -> str:
    """Trigger first (none for regularization images), then ``keep_tokens`` fixed tags, then the
    rest (shuffled, dropped out)."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    fixed, rest = (
        list(tags[:keep_tokens]),
        [tag for tag in tags[keep_tokens:] if not (tag_dropout and rng.random() < tag_dropout)],
    )
    if shuffle:
        rng.shuffle(rest)
    return ", ".join([*([trigger] if trigger else []), *fixed, *rest])


def read_metadata(dataset_dir: Path) -> list[dict]:
    with (dataset_dir / "metadata.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


class LatentCache:
    """VAE latents keyed by image content, base model and bucket; in memory, optionally on disk."""

    def __init__(self, vae: torch.nn.Module, model_key: str, device: torch.device, folder: Path | None) -> None:
        self.vae, self.device, self.folder = vae, device, folder
        self.model_key = model_key
        self.scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
        self.memory: dict[str, torch.Tensor] = {}
        self.encoded = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of a [B, 3, h, w] batch in -1..1 (no caching)."""
        self.encoded += pixels.shape[0]
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent_dist.mean.float() * self.scale

    def get(self, pixels: Image.Image) -> torch.Tensor:
        key = hashlib.sha256(pixels.tobytes() + f"{pixels.size}|{self.model_key}".encode()).hexdigest()
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.pt" if self.folder else None
        if path is not None and path.is_file():
            latent = torch.load(path, weights_only=True)
        else:
            latent = self.encode(to_tensor(pixels).unsqueeze(0))[0].cpu()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")  # training processes may encode the same image at once
                torch.save(latent, tmp)
                tmp.replace(path)
        self.memory[key] = latent
        return latent


def load_examples(
    dataset_dir: Path,
    cache: LatentCache,
    resolution: int,
    step: int,
    flip: bool,
    cached: bool = True,
    on_item: Callable[[], None] | None = None,
    fixed: list[tuple[int, int]] | None = None,
    regularization: bool = False,
) -> tuple[list[Example], dict[str, int]]:
    """Bucket every dataset image and encode it once (and its mirror image when ``flip``);
    with ``cached`` off, keep the bucketed pixels for encoding at every step instead.
    ``fixed`` is a classic bucket list (see ``buckets.fixed_buckets``); None means never upscale."""
    examples: list[Example] = []
    counts = {"unreadable": 0, "too_small": 0}
    for record in read_metadata(dataset_dir):
        if on_item:
            on_item()
        try:
            with Image.open(dataset_dir / record["file"]) as raw:
                image = raw.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            log.warning("skipping unreadable training image %s: %s", record["file"], exc)
            counts["unreadable"] += 1
            continue
        placement = (
            buckets.fit_fixed(image.width, image.height, fixed)
            if fixed
            else buckets.fit(image.width, image.height, resolution, step)
        )
        if placement is None:
            counts["too_small"] += 1
            continue
        pixels = buckets.apply(image, placement)
        (width, height), (bucket_w, bucket_h) = placement.resized, placement.bucket
        examples.append(
            Example(
                file=record["file"],
                group=record.get("group", "image"),
                source=str(record.get("post_id", record["file"])),
                tags=list(record.get("tags", [])),
                bucket=placement.bucket,
                latent=cache.get(pixels) if cached else None,
                original_size=(image.height, image.width),
                crop=((height - bucket_h) // 2, (width - bucket_w) // 2),
                flipped=cache.get(ImageOps.mirror(pixels)) if flip and cached else None,
                pixels=None if cached else to_tensor(pixels),
                regularization=regularization,
            )
        )
    return examples, counts


def split_validation(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole source images (all their crops) until ``share`` of the examples is reached."""
    wanted = int(share * len(examples))
    if wanted == 0:
        return examples, []
    sources = sorted({ex.source for ex in examples})
    random.Random(seed).shuffle(sources)
    held: set[str] = set()
    count = 0
    for source in sources:
        if count >= wanted:
            break
        held.add(source)
        count += sum(1 for ex in examples if ex.source == source)
    if count >= len(examples):  # never hold out everything
        return examples, []
    return [ex for ex in examples if ex.source not in held], [ex for ex in examples if ex.source in held]


def batch_plan(
    examples: list[Example],
    batch_size: int,
    rng: random.Random,
    repeats: dict[str, int],
    waiting: dict[tuple[int, int], list[int]] | None = None,
) -> list[list[int]]:
    """One epoch of batches: each training example ``repeats[group]`` times, shuffled within its
    bucket, batch order shuffled.

    Regularization examples are balanced as kohya does: exactly as many regularization samples as
    training samples per epoch (repeating the set round-robin, or drawing a different subset each
    epoch when it is larger), sharing buckets and batches with the training samples.

    Without ``waiting``, a bucket's last batch is partial (kohya). With it, every batch is full: a
    bucket's leftovers are put in ``waiting`` (updated in place) and lead its batches next epoch, so
    each sample is still drawn once per epoch on average. The plan is empty when no bucket has a
    full batch yet; the next epoch adds to ``waiting``.
    """
    chosen: list[int] = []
    for index, example in enumerate(examples):
        if not example.regularization:
            chosen.extend([index] * repeats.get(example.group, 1))
    regular = [index for index, example in enumerate(examples) if example.regularization]
    if regular:
        wanted = len(chosen)
        rng.shuffle(regular)
        chosen += (regular * (wanted // len(regular) + 1))[:wanted]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in chosen:
        by_bucket.setdefault(examples[index].bucket, []).append(index)
    plan = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket][:]
        rng.shuffle(indices)
        if waiting is not None:
            indices = waiting.pop(bucket, []) + indices
            full = len(indices) - len(indices) % batch_size
            if full < len(indices):
                waiting[bucket] = indices[full:]
            indices = indices[:full]
        plan += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(plan)
    return plan
