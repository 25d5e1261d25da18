"""LPIPS perceptual difference: features once per image, then cheap pairwise differences."""

from __future__ import annotations

from typing import Any

from PIL import Image


def features(image: Image.Image) -> Any:
    from imgutils.metrics import lpips_extract_feature

    return lpips_extract_feature(image)


def difference(a: Any, b: Any) -> float:
    """Lower is more similar; under about 0.45 is usually the same picture."""
    from imgutils.metrics import lpips_difference

    return float(lpips_difference(a, b))
