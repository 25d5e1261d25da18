"""WD14 tagging and tag clean-up."""

from __future__ import annotations

import csv
from functools import lru_cache

from PIL import Image


def tag_image(image: Image.Image, model_name: str, general_threshold: float, drop_overlap: bool) -> dict[str, float]:
    """General tags above the threshold, highest score first (imgutils returns CSV order)."""
    from imgutils.tagging import drop_overlap_tags, get_wd14_tags

    general = get_wd14_tags(image, model_name=model_name, general_threshold=general_threshold, fmt="general")
    if drop_overlap:
        general = drop_overlap_tags(general)
    return dict(sorted(((tag, float(score)) for tag, score in general.items()), key=lambda item: (-item[1], item[0])))


def tag_scores(image: Image.Image, model_name: str) -> dict[str, float]:
    """Every general tag's probability (threshold 0), for checking what a prompt asked for."""
    from imgutils.tagging import get_wd14_tags

    return {
        tag: float(score)
        for tag, score in get_wd14_tags(image, model_name=model_name, general_threshold=0.0, fmt="general").items()
    }


def rating(image: Image.Image, model_name: str) -> str:
    """The most likely of WD14's ratings: ``general``, ``sensitive``, ``questionable``, ``explicit``."""
    from imgutils.tagging import get_wd14_tags

    scores = get_wd14_tags(image, model_name=model_name, fmt="rating")
    return str(max(scores, key=scores.get))


def is_character_trait(tag: str) -> bool:
    """True for tags that describe the character herself (hair, eyes, ears...), per imgutils' rules."""
    from imgutils.tagging import is_basic_character_tag

    return bool(is_basic_character_tag(tag))


def drop_blacklisted(tags: dict[str, float]) -> dict[str, float]:
    """Without tags on imgutils' preset blacklist (e.g. ``cosplay``), order kept."""
    from imgutils.tagging import drop_blacklisted_tags

    kept = drop_blacklisted_tags(tags)
    return {tag: score for tag, score in tags.items() if tag in kept}


@lru_cache(maxsize=4)
def tag_counts(model_name: str) -> dict[str, int]:
    """How often each tag occurs in the tagger's training data (the ``count`` column of its
    ``selected_tags.csv``)."""
    from huggingface_hub import hf_hub_download
    from imgutils.tagging.wd14 import LABEL_FILENAME, MODEL_NAMES

    path = hf_hub_download(MODEL_NAMES[model_name], LABEL_FILENAME)
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["name"]: int(row["count"]) for row in csv.DictReader(handle)}
