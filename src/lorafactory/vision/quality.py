"""Image-quality scorers from imgutils' model families: AI-corruption and anime aesthetics."""

from __future__ import annotations

from PIL import Image

AI_CORRUPT_REPO = "deepghs/ai_image_corrupted"


def ai_corrupt_score(image: Image.Image, model_name: str) -> float:
    """``1 - P(corrupted)`` from the AI-image corruption classifier: 1 = clean, 0 = broken."""
    from imgutils.generic import classify_predict_score

    return 1.0 - float(classify_predict_score(image, AI_CORRUPT_REPO, model_name)["corrupted"])


def aesthetic_percentile(image: Image.Image, model_name: str) -> float:
    """Where the image's aesthetic score falls among the model's reference images, 0..1."""
    from imgutils.metrics import anime_dbaesthetic

    return float(anime_dbaesthetic(image, model_name=model_name, fmt="percentile"))
