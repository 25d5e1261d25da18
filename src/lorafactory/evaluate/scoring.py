"""Scoring one checkpoint's images: every metric per image, their means and bootstrap intervals.

A metric whose model cannot be loaded or run is recorded as missing (None), with the reason, and
not tried again for later checkpoints; it never becomes a zero.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image

from lorafactory.config import Settings
from lorafactory.errors import first_line
from lorafactory.evaluate.attention import plain_text
from lorafactory.evaluate.metrics import (
    bikini_plus,
    bootstrap_interval,
    ccip_recscore,
    image_matches,
    prompt_tags,
    tag_weights,
    vendi_score,
)
from lorafactory.evaluate.prompts import Job
from lorafactory.hubfetch import HubRefused, HubUnavailable, hub_failure
from lorafactory.vision.ccip import differences, extract_features
from lorafactory.vision.quality import aesthetic_percentile, ai_corrupt_score
from lorafactory.vision.tagging import is_character_trait, tag_counts, tag_scores

log = logging.getLogger(__name__)
T = TypeVar("T")

# column -> plot/card label, in display order
METRICS: dict[str, str] = {
    "ccip_recscore": "CCIP RecScore (fidelity)",
    "ccip_image_share": "CCIP image share",
    "bikini": "bikini score",
    "bikini_plus": "BikiniPlus (prompt adherence)",
    "ai_corrupt": "AI-corruption (1 = clean)",
    "clip_alignment": "CLIP text alignment",
    "diversity": "diversity (Vendi)",
    "aesthetic": "aesthetic percentile",
    "validation_loss": "validation loss",
}
# what a missing model or a failing model run raises (huggingface_hub's not-found errors are OSErrors; a loader
# of ours names the model the Hub did not give)
MODEL_ERRORS = (OSError, ValueError, RuntimeError, KeyError, ImportError, HubRefused, HubUnavailable)


def _reason(exc: Exception) -> str:
    """Why a metric is missing, in one line: the model the Hub did not give, named, or the error's own words."""
    named = exc if isinstance(exc, (HubRefused, HubUnavailable)) else hub_failure(exc)
    if named is not None:
        return first_line(named)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


# metric averaged over the images -> the key of its per-image values (ccip_image_share comes from "ccip" too)
PER_IMAGE_KEYS = {
    "ccip_recscore": "ccip",
    "bikini": "bikini",
    "bikini_plus": "bikini_plus",
    "ai_corrupt": "ai_corrupt",
    "clip_alignment": "clip_alignment",
    "aesthetic": "aesthetic",
}


@dataclass
class Measured:
    """Per-image model outputs for some of a checkpoint's images."""

    per_image: dict[str, dict[str, float]]  # file name -> metric -> value, in the order measured
    clip_features: np.ndarray | None  # [images, dim] CLIP image embeddings, rows in per_image's order


@dataclass
class StepScores:
    values: dict[str, float | None]
    intervals: dict[str, tuple[float, float] | None]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # file name -> metric -> value
    images: int = 0  # how many of the checkpoint's images were scored


class Scorer:
    def __init__(
        self, settings: Settings, trigger: str, dataset_features: np.ndarray, threshold: float, device: torch.device
    ) -> None:
        self.settings, self.trigger = settings, trigger
        self.dataset_features, self.threshold, self.device = dataset_features, threshold, device
        self.missing: dict[str, str] = {}  # metric -> why it could not be computed
        self._clip = None
        self._excluded: set[str] | None = None  # tags BikiniPlus leaves out: the trigger and character traits
        self._weights: dict[str, float] | None = None  # BikiniPlus's tag weights, from the tagger's tag counts

    def _attempt(self, metrics: tuple[str, ...], compute: Callable[[], T]) -> T | None:
        if any(m in self.missing for m in metrics):
            return None
        try:
            return compute()
        except MODEL_ERRORS as exc:
            reason = _reason(exc)
            for metric in metrics:
                self.missing[metric] = reason
            log.warning("%s cannot be computed and is reported as missing: %s", ", ".join(metrics), reason)
            return None

    def _clip_model(self):
        if self._clip is None:
            from lorafactory.vision.clip import Clip

            self._clip = Clip(self.settings.evaluate.clip_model, self.device)
        return self._clip

    def score(self, work: list[Job], images: list[Image.Image]) -> StepScores:
        """Every metric of these images, with means and intervals."""
        return self.summarise(work, [self.measure(work, images)])

    def measure(self, work: list[Job], images: list[Image.Image]) -> Measured:
        """The per-image model outputs: the slow part, run batch by batch while later images render."""
        e, v = self.settings.evaluate, self.settings.vision
        per_image: dict[str, dict[str, float]] = defaultdict(dict)
        names = [job.filename for job in work]

        def put(metric: str, values: list[float | None] | None) -> None:
            for name, value in zip(names, values or []):
                if value is not None:
                    per_image[name][metric] = float(value)

        matched = self._attempt(
            ("ccip_recscore", "ccip_image_share"),
            lambda: (
                ccip_recscore(
                    differences(extract_features(images, v.ccip_model), self.dataset_features, v.ccip_model),
                    self.threshold,
                ).per_image
            ),
        )
        put("ccip", matched)
        tags = self._attempt(("bikini", "bikini_plus"), lambda: self._tag_scores(images))
        if tags is not None:
            put(
                "bikini",
                [
                    scores.get("bikini", 0.0) if job.prompt_name.startswith("bikini") else None
                    for job, scores in zip(work, tags)
                ],
            )
            put("bikini_plus", [self._adherence(job, scores) for job, scores in zip(work, tags)])
        put(
            "ai_corrupt",
            self._attempt(("ai_corrupt",), lambda: [ai_corrupt_score(image, v.ai_corrupt_model) for image in images]),
        )
        if e.aesthetic:
            put(
                "aesthetic",
                self._attempt(
                    ("aesthetic",), lambda: [aesthetic_percentile(image, v.aesthetic_model) for image in images]
                ),
            )
        features = None
        if e.clip_model:
            embedded = self._attempt(("clip_alignment", "diversity"), lambda: self._clip_scores(work, images))
            if embedded is not None:
                put("clip_alignment", embedded[0])
                features = embedded[1]
        else:
            self.missing.setdefault("clip_alignment", "evaluate.clip_model is empty")
            self.missing.setdefault("diversity", "evaluate.clip_model is empty")
        return Measured({name: per_image.get(name, {}) for name in names}, features)

    def summarise(self, work: list[Job], parts: list[Measured]) -> StepScores:
        """Means and intervals over ``work``'s images, from the parts measured for them (any order). A metric
        whose model failed on any part is missing for the whole checkpoint, as if scored in one go."""
        per_image = {name: values for part in parts for name, values in part.per_image.items()}
        per_image = {job.filename: dict(per_image[job.filename]) for job in work}  # suite order: same intervals
        for metric in self.missing.keys() & PER_IMAGE_KEYS.keys():  # ccip_image_share goes with ccip_recscore
            for values in per_image.values():
                values.pop(PER_IMAGE_KEYS[metric], None)
        diversity = None
        if "diversity" not in self.missing and all(part.clip_features is not None for part in parts):
            features = {name: row for part in parts for name, row in zip(part.per_image, part.clip_features)}
            groups: dict[str, list[np.ndarray]] = defaultdict(list)
            for job in work:
                groups[job.prompt_name].append(features[job.filename])
            vendi = [vendi_score(np.stack(rows)) for rows in groups.values() if len(rows) > 1]
            diversity = float(np.mean(vendi)) if vendi else None
        matched = None if "ccip_recscore" in self.missing else [values.get("ccip") for values in per_image.values()]
        scores = self._summarise(per_image, matched, diversity)
        scores.images = len(work)
        return scores

    def _tag_scores(self, images: list[Image.Image]) -> list[dict[str, float]]:
        model = self.settings.vision.tagger_model
        if self._weights is None:
            self._weights = tag_weights(tag_counts(model))
        return [tag_scores(image, model) for image in images]

    def _adherence(self, job: Job, scores: dict[str, float]) -> float | None:
        vocabulary = set(scores)  # the tagger's whole vocabulary: the same for every image
        if self._excluded is None:
            self._excluded = {self.trigger} | {tag for tag in vocabulary if is_character_trait(tag)}
        return bikini_plus(
            scores,
            prompt_tags(job.prompt, vocabulary, self._excluded),
            prompt_tags(job.negative, vocabulary, self._excluded),
            self._weights or {},
        )

    def _clip_scores(self, work: list[Job], images: list[Image.Image]) -> tuple[list[float], np.ndarray]:
        """Each image's cosine with its own prompt (trigger removed), and the image embeddings."""
        clip = self._clip_model()
        features = clip.images(images)
        texts = [
            ", ".join(
                part.strip()
                for part in plain_text(job.prompt).split(",")
                if part.strip() and part.strip() != self.trigger
            )
            for job in work
        ]
        alignment = [float(x) for x in np.sum(features * clip.texts(texts), axis=1)]
        return alignment, features

    def _summarise(
        self, per_image: dict[str, dict[str, float]], matched: list[float] | None, diversity: float | None
    ) -> StepScores:
        resamples = self.settings.evaluate.bootstrap
        values: dict[str, float | None] = {}
        intervals: dict[str, tuple[float, float] | None] = {}
        for column, key in PER_IMAGE_KEYS.items():
            found = [scores[key] for scores in per_image.values() if key in scores]
            values[column] = float(np.mean(found)) if found else None
            intervals[column] = bootstrap_interval(found, resamples)
        shares = image_matches(matched) if matched is not None else []
        values["ccip_image_share"] = float(np.mean(shares)) if shares else None
        intervals["ccip_image_share"] = bootstrap_interval(shares, resamples)
        values["diversity"], intervals["diversity"] = diversity, None
        return StepScores(values, intervals, per_image)
