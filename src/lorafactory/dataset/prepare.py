"""The prepare stage: clean raw images, crop in 3 stages, tag, and write captions.

The chain, each step configurable and counted in the manifest:
decode (with a decompression-bomb guard) -> size -> monochrome -> anime class -> exact duplicates ->
near duplicates -> person split -> one head per person -> CCIP purity -> half-body and head crops ->
WD14 tags -> overlap and blacklist clean-up -> core tags -> captions.

Output: ``images/<name>.png`` with ``<name>.txt`` captions (trigger first) and ``metadata.jsonl``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image, UnidentifiedImageError

from lorafactory.config import Settings
from lorafactory.dataset.clean import load_rgb, pixel_digest
from lorafactory.dataset.crops import Crop, head_count, inner_crops, person_crops
from lorafactory.dataset.dedupe import near_duplicates
from lorafactory.dataset.purity import purify
from lorafactory.dataset.tags import caption, core_tags, prompt_tag
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.sources.base import Post
from lorafactory.sources.crawl import read_posts
from lorafactory.vision import ccip
from lorafactory.vision.classify import anime_class, monochrome_score
from lorafactory.vision.tagging import drop_blacklisted, is_character_trait, tag_image

log = logging.getLogger(__name__)
T = TypeVar("T")


class Chain:
    """Runs filter steps in order and records each one's in and out counts."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.steps: list[dict] = []

    def filter(self, name: str, items: list[T], keep: Callable[[T], bool]) -> list[T]:
        with self.progress.task(name, total=len(items)) as task:
            kept = []
            for item in items:
                if keep(item):
                    kept.append(item)
                task.advance()
        return self.record(name, items, kept)

    def record(self, name: str, before: list, after: list[T]) -> list[T]:
        self.steps.append({"step": name, "in": len(before), "out": len(after)})
        return after


def _decode(raw_dir: Path, post: Post, max_area_side: int) -> Image.Image | str:
    """The image, or the reason it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_rgb(raw_dir / "images" / post.filename, max_area_side)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        log.warning("skipping %s: larger than prepare.max_pixels (decompression-bomb guard)", post.filename)
        return "bomb"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        log.warning("skipping unreadable image %s: %s", post.filename, exc)
        return "unreadable"


def prepare(
    settings: Settings, trigger: str | None, raw_dir: Path, out_dir: Path, progress: Progress
) -> tuple[dict, dict]:
    """Returns (counts, details) for the manifest; ``trigger`` None makes a generic set (no trigger in captions)."""
    p, v = settings.prepare, settings.vision
    posts = read_posts(raw_dir)
    chain = Chain(progress)
    Image.MAX_IMAGE_PIXELS = p.max_pixels

    decoded = [(post, _decode(raw_dir, post, p.max_area_side)) for post in posts]
    images = chain.record(
        "decode", posts, [(post, image) for post, image in decoded if isinstance(image, Image.Image)]
    )
    images = chain.filter(
        "size", images, lambda pi: min(pi[1].size) >= p.min_side and pi[1].width * pi[1].height >= p.min_area_side**2
    )
    images = chain.filter(
        "monochrome", images, lambda pi: monochrome_score(pi[1], v.monochrome_model) < p.monochrome_threshold
    )
    if p.drop_classes:
        images = chain.filter(
            "anime class", images, lambda pi: anime_class(pi[1], v.classify_model)[0] not in p.drop_classes
        )
    seen: set[str] = set()
    images = chain.filter(
        "exact duplicates", images, lambda pi: not (pixel_digest(pi[1]) in seen or seen.add(pixel_digest(pi[1])))
    )
    if p.near_duplicates != "off":
        with progress.task("near duplicates", total=len(images)) as task:
            drop = set(
                near_duplicates(
                    [image for _, image in images], p.near_duplicates, p.hash_distance, p.lpips_threshold, task.advance
                )
            )
        images = chain.record("near duplicates", images, [pi for i, pi in enumerate(images) if i not in drop])

    with progress.task("person split", total=len(images)) as task:
        persons: list[tuple[Post, Crop]] = []
        for post, image in images:
            persons += [(post, crop) for crop in person_crops(image, p, v)]
            task.advance()
    persons = chain.record("person split", images, persons)
    if p.single_head:
        persons = chain.filter("one head", persons, lambda pc: head_count(pc[1], v) == 1)
    if p.purity and persons:
        features = ccip.extract_features([crop.image for _, crop in persons], v.ccip_model)
        threshold = ccip.default_threshold(v.ccip_model)
        result = purify(
            features, v.ccip_model, p.purity_bootstrap, p.purity_cluster_share, p.purity_min_match, threshold
        )
        log.info("CCIP purity: %s", result.note)
        persons = chain.record("ccip purity", persons, [pc for pc, keep in zip(persons, result.keep) if keep])

    crops: list[tuple[Post, Crop]] = []
    for post, person in persons:
        if "person" in p.crops:
            crops.append((post, person))
        crops += [(post, crop) for crop in inner_crops(person, p, v)]
    records = _tag_and_save(crops, settings, out_dir, progress)
    if len(records) < p.min_images:
        raise InputError(
            f"only {len(records)} images left after cleaning and cropping (need prepare.min_images={p.min_images}); "
            "crawl more images or relax the prepare.* filters"
        )
    return _write_dataset(records, chain, trigger, settings, out_dir, len(posts))


def with_own_tags(scores: dict[str, float], own: list[str]) -> dict[str, float]:
    """The tagger's tags plus the image's own (from its .txt file), which count as certain."""
    return {**scores, **{tag: 1.0 for tag in own if tag}}


def _tag_and_save(crops: list[tuple[Post, Crop]], settings: Settings, out_dir: Path, progress: Progress) -> list[dict]:
    p, v = settings.prepare, settings.vision
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with progress.task("tagging", total=len(crops)) as task:
        for post, crop in crops:
            name = f"{Path(post.filename).stem}_{crop.suffix}"
            crop.image.save(images_dir / f"{name}.png")
            tags = tag_image(crop.image, v.tagger_model, p.general_threshold, p.drop_overlap)
            if p.sidecar_tags and post.site == "local" and crop.group == "person":
                tags = with_own_tags(tags, post.tags.get("general", []))
            if p.drop_blacklisted:
                tags = drop_blacklisted(tags)
            records.append(
                {
                    "file": f"images/{name}.png",
                    "group": crop.group,
                    "source": post.site,
                    "post_id": post.post_id,
                    "scores": tags,
                }
            )
            task.advance()
    return records


def _write_dataset(
    records: list[dict], chain: Chain, trigger: str | None, settings: Settings, out_dir: Path, raw: int
) -> tuple[dict, dict]:
    p = settings.prepare
    core = core_tags([list(r["scores"]) for r in records], p.core_tag_ratio, is_character_trait)
    pruned = set(core) if p.prune_core_tags else set()
    frequency: Counter[str] = Counter()
    with (out_dir / "metadata.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            tags = [prompt_tag(tag) for tag in record["scores"] if tag not in pruned]
            frequency.update(tags)
            record["tags"] = tags
            record["caption"] = caption(trigger, tags)
            (out_dir / record["file"]).with_suffix(".txt").write_text(record["caption"] + "\n", encoding="utf-8")
            handle.write(json.dumps(record) + "\n")

    groups = Counter(r["group"] for r in records)
    counts = {"raw": raw, **{step["step"].replace(" ", "_"): step["out"] for step in chain.steps}}
    counts.update({f"crops_{g}": groups.get(g, 0) for g in ("person", "halfbody", "head")})
    counts["dataset"] = len(records)
    details = {
        "trigger": trigger,
        "filters": chain.steps,
        "ratios": {
            "head": round(groups.get("head", 0) / len(records), 4),
            "halfbody": round(groups.get("halfbody", 0) / len(records), 4),
            "dataset": round(len(records) / raw, 4) if raw else 0.0,
        },
        "core_tags": core,
        "pruned_core_tags": sorted(pruned),
        "tag_frequency": dict(frequency.most_common()),
        "per_site": dict(Counter(r["source"] for r in records)),
    }
    return counts, details
