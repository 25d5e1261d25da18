"""Image-level cleaning steps; each returns whether the image stays, and counts its reason."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps

_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16/32-bit grayscale: Pillow's convert would clip to white


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (an "I" image whose values fit 8 bits is kept as it is)."""
    values = np.asarray(image, dtype=np.float64)
    peak = 255.0 if image.mode == "I" and values.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")


def load_rgb(path, max_area_side: int) -> Image.Image:
    """Decode upright (EXIF orientation applied), with 16-bit grayscale scaled, transparency
    composited on white, and shrunk to at most ``max_area_side``² pixels."""
    with Image.open(path) as opened:
        opened.load()
        raw = ImageOps.exif_transpose(opened)
        if raw.mode in _WIDE_GRAY:
            raw = _gray_to_8bit(raw)
        if raw.mode in ("RGBA", "LA", "P"):
            rgba = raw.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.split()[3])
        else:
            image = raw.convert("RGB")
    area = image.width * image.height
    limit = max_area_side * max_area_side
    if area > limit:
        scale = (limit / area) ** 0.5
        image = image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS
        )
    return image


def pixel_digest(image: Image.Image) -> str:
    """Identical pixels give identical digests, whatever the file format."""
    return hashlib.md5(image.tobytes()).hexdigest()
