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


def bangumi_char_class(image: Image.Image, model_name: str) -> tuple[str, float]:
    """The most likely of ``vision, imagery, halfbody, face`` for a character cut from an anime frame;
    ``vision`` marks a character drawn without facial detail (a background character)."""
    from imgutils.validate import anime_bangumi_char

    label, score = anime_bangumi_char(image, model_name=model_name)
    return str(label), float(score)
