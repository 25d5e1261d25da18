"""Image-level cleaning steps; each returns whether the image stays, and counts its reason."""

from __future__ import annotations

import hashlib

from PIL import Image


def load_rgb(path, max_area_side: int) -> Image.Image:
    """Decode, composite transparency on white, and shrink to at most ``max_area_side``² pixels."""
    with Image.open(path) as raw:
        raw.load()
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
