"""Image classifiers."""

from __future__ import annotations

from PIL import Image


def monochrome_score(image: Image.Image, model_name: str) -> float:
    """P(monochrome). Use this with a threshold: imgutils' ``is_monochrome`` ignores its own."""
    from imgutils.validate import get_monochrome_score

    return float(get_monochrome_score(image, model_name=model_name))


def anime_class(image: Image.Image, model_name: str) -> tuple[str, float]:
    """The most likely of ``3d, bangumi, comic, illustration, not_painting`` and its probability."""
    from imgutils.validate import anime_classify

    label, score = anime_classify(image, model_name=model_name)
    return str(label), float(score)
