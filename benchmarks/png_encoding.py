"""What writing evaluation images costs the host: PNG compression per image, by zlib level and size.

Every evaluation image is written as a PNG with its A1111 parameters. This times that write for the
sizes the presets render (SD1.5 512x512, SDXL 832x1216) at PIL's default level 6 and at the level
the evaluator uses, on synthetic character images with render-like grain. Levels alternate, each
repeated; it prints the median and spread of wall time, process CPU time and file size. By hand:

    PYTHONPATH=src python benchmarks/png_encoding.py [--repeats 5] [--images 8]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorafactory.evaluate.generate import PNG_COMPRESS_LEVEL
from lorafactory.testing.synthetic import CHARACTERS

SIZES = {"sd15 512x512": (512, 512), "sdxl 832x1216": (832, 1216)}


def render_like(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic character with the fine grain a diffusion render has (flat colours compress too well)."""
    image = CHARACTERS[seed % len(CHARACTERS)].draw(width, height, outfit=seed % 3, rng=random.Random(seed))
    grain = np.random.default_rng(seed).integers(-4, 5, (height, width, 3))
    return Image.fromarray((np.asarray(image).astype(np.int16) + grain).clip(0, 255).astype(np.uint8))


def write_all(images: list[Image.Image], level: int) -> tuple[float, float, int]:
    """Milliseconds of wall and process CPU time per image, and bytes per image."""
    info = PngInfo()
    info.add_text("parameters", "portrait, smile, Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7")
    size, wall, cpu = 0, time.perf_counter(), time.process_time()
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=level)
        size += buffer.tell()
    count = len(images)
    return (time.perf_counter() - wall) * 1000 / count, (time.process_time() - cpu) * 1000 / count, size // count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    levels = (6, PNG_COMPRESS_LEVEL)
    for name, (width, height) in SIZES.items():
        images = [render_like(width, height, seed) for seed in range(args.images)]
        results: dict[int, list[tuple[float, float, int]]] = {level: [] for level in levels}
        for _ in range(args.repeats):
            for level in levels:  # alternated
                results[level].append(write_all(images, level))
        for level in levels:
            walls, cpus, sizes = zip(*results[level])
            print(
                f"{name} level {level}: wall {statistics.median(walls):6.1f} ms [{min(walls):.1f}-{max(walls):.1f}], "
                f"CPU {statistics.median(cpus):6.1f} ms, {sizes[0] / 1024:.0f} KiB per image"
            )


if __name__ == "__main__":
    main()
