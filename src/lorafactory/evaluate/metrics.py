"""Metrics of generated images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecScore:
    """CCIP RecScore: the share of (generated, dataset) pairs judged the same character.

    ``image_share`` is the easier-to-read companion: the share of generated images that match
    at least half of the dataset images. ``per_image`` keeps each image's matched fraction.
    """

    pair_share: float
    image_share: float
    per_image: list[float]


def ccip_recscore(differences: np.ndarray, threshold: float) -> RecScore:
    """``differences`` is [generated, dataset]; a pair matches when its difference is below ``threshold``."""
    if differences.size == 0:
        raise ValueError("RecScore needs at least one generated and one dataset image")
    matched = (differences < threshold).mean(axis=1)
    return RecScore(float(matched.mean()), float(np.mean(image_matches(matched))), [float(x) for x in matched])


def image_matches(matched_fractions) -> list[float]:
    """1.0 for each generated image that matches at least half of the dataset images, else 0.0."""
    return [float(x >= 0.5) for x in matched_fractions]


def prompt_tags(text: str, vocabulary: set[str], exclude: set[str] = frozenset()) -> list[str]:
    """The comma-separated prompt parts the tagger knows (spaces as underscores), minus ``exclude``."""
    parts = (part.strip().lower().replace(" ", "_") for part in text.split(","))
    return list(dict.fromkeys(part for part in parts if part in vocabulary and part not in exclude))


def bikini_plus(scores: dict[str, float], positive: list[str], negative: list[str]) -> float | None:
    """Prompt adherence of one image: the mean of P(tag) over the prompt's tags and 1 - P(tag) over
    the negative prompt's. None (missing, not zero) when the prompts hold no tag the tagger knows."""
    values = [scores.get(tag, 0.0) for tag in positive] + [1.0 - scores.get(tag, 0.0) for tag in negative]
    return float(np.mean(values)) if values else None


def vendi_score(features: np.ndarray) -> float:
    """Vendi diversity: exp of the entropy of the eigenvalues of K/n, K the cosine-similarity kernel.

    1 for identical images, n for n mutually orthogonal ones."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    eigenvalues = np.linalg.eigvalsh(unit @ unit.T / len(unit)).clip(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def bootstrap_interval(
    values: list[float], resamples: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None with fewer than two values or no resamples."""
    if resamples <= 0 or len(values) < 2:
        return None
    data = np.asarray(values, dtype=np.float64)
    means = data[np.random.default_rng(seed).integers(0, len(data), (resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
