"""Metrics of generated images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafactory.evaluate.attention import plain_text


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
    """The comma-separated prompt parts the tagger knows (spaces as underscores, emphasis syntax
    removed), minus ``exclude``."""
    parts = (part.strip().lower().replace(" ", "_") for part in plain_text(text).split(","))
    return list(dict.fromkeys(part for part in parts if part in vocabulary and part not in exclude))


BIKINI_PLUS_BASE = 1.5


def tag_weights(counts: dict[str, int]) -> dict[str, float]:
    """BikiniPlus's weight of each tag, ``1.5 ** (ln(count) - p75)``, p75 the 75th percentile of
    the log counts over the tagger's vocabulary: common tags weigh more, a p75 tag weighs 1."""
    logs = {tag: float(np.log(max(count, 1))) for tag, count in counts.items()}
    p75 = float(np.percentile(list(logs.values()), 75)) if logs else 0.0
    return {tag: BIKINI_PLUS_BASE ** (value - p75) for tag, value in logs.items()}


def bikini_plus(
    scores: dict[str, float], positive: list[str], negative: list[str], weights: dict[str, float]
) -> float | None:
    """Prompt adherence of one image: the weighted mean of P(tag) over the prompt's tags and
    1 - P(tag) over the negative prompt's (``weights`` from ``tag_weights``; 1 for a tag without a
    count). None (missing, not zero) when the prompts hold no tag the tagger knows."""
    pairs = [(scores.get(tag, 0.0), weights.get(tag, 1.0)) for tag in positive]
    pairs += [(1.0 - scores.get(tag, 0.0), weights.get(tag, 1.0)) for tag in negative]
    if not pairs:
        return None
    values, tag_weight = np.array(pairs).T
    return float(np.sum(values * tag_weight) / np.sum(tag_weight))


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
