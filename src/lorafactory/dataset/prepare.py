"""The prepare stage: clean raw images, crop in 3 stages, tag, and write captions.

Output: ``images/<name>.png`` with ``<name>.txt`` captions (trigger first) and ``metadata.jsonl``.
The manifest counts the images after every step.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from PIL import UnidentifiedImageError

from lorafactory.config import Settings
from lorafactory.dataset.clean import load_rgb, pixel_digest
from lorafactory.dataset.crops import three_stage
from lorafactory.dataset.tags import caption, core_tags, prompt_tag
from lorafactory.errors import InputError
from lorafactory.progress import Progress
from lorafactory.sources.crawl import read_posts
from lorafactory.vision.classify import monochrome_score
from lorafactory.vision.tagging import is_character_trait, tag_image

log = logging.getLogger(__name__)


def prepare(settings: Settings, trigger: str, raw_dir: Path, out_dir: Path, progress: Progress) -> tuple[dict, dict]:
    """Returns (counts, details) for the manifest."""
    p, v = settings.prepare, settings.vision
    posts = read_posts(raw_dir)
    counts: Counter[str] = Counter(raw=len(posts))
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    kept = []
    seen: set[str] = set()
    with progress.task("cleaning", total=len(posts)) as task:
        for post in posts:
            task.advance()
            try:
                image = load_rgb(raw_dir / "images" / post.filename, p.max_area_side)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                log.warning("skipping unreadable image %s: %s", post.filename, exc)
                counts["dropped_unreadable"] += 1
                continue
            if min(image.size) < p.min_side:
                counts["dropped_small"] += 1
                continue
            if monochrome_score(image, v.monochrome_model) >= p.monochrome_threshold:
                counts["dropped_monochrome"] += 1
                continue
            digest = pixel_digest(image)
            if digest in seen:
                counts["dropped_duplicate"] += 1
                continue
            seen.add(digest)
            kept.append((post, image))
    counts["after_cleaning"] = len(kept)

    records = []
    with progress.task("cropping and tagging", total=len(kept)) as task:
        for post, image in kept:
            task.advance()
            for crop in three_stage(image, p, v):
                name = f"{Path(post.filename).stem}_{crop.suffix}"
                crop.image.save(images_dir / f"{name}.png")
                tags = tag_image(crop.image, v.tagger_model, p.general_threshold, p.drop_overlap)
                records.append({"file": f"images/{name}.png", "group": crop.group, "source": post.site, "post_id": post.post_id, "scores": tags})
                counts[f"crops_{crop.group}"] += 1
    if len(records) < p.min_images:
        for record in records:
            (out_dir / record["file"]).unlink(missing_ok=True)
        raise InputError(
            f"only {len(records)} images left after cleaning and cropping (need prepare.min_images={p.min_images}); "
            "crawl more images or relax the prepare.* filters"
        )

    tag_lists = [list(record["scores"]) for record in records]
    core = core_tags(tag_lists, p.core_tag_ratio, is_character_trait)
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

    counts["dataset"] = len(records)
    details = {
        "trigger": trigger,
        "core_tags": core,
        "pruned_core_tags": sorted(pruned),
        "tag_frequency": dict(frequency.most_common()),
        "per_site": dict(Counter(record["source"] for record in records)),
    }
    return dict(counts), details
