"""Synthetic anime episodes: synthetic characters in shots with hard cuts, encoded with PyAV.

Each shot has its own background and cast, drawn once and panned a little every frame (so frames
of a shot differ, as animation does); a shot may be dark (a fade). The true cut times come back
with the file, for tests that check the shot detector.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorafactory.testing.synthetic import CHARACTERS


@dataclass(frozen=True)
class Shot:
    seconds: float
    background: tuple[int, int, int]
    cast: tuple[int, ...] = ()  # indices into ``synthetic.CHARACTERS``
    dark: bool = False


def _shot_canvas(shot: Shot, size: tuple[int, int], rng: random.Random) -> Image.Image:
    width, height = size
    canvas = Image.new("RGB", (width + 32, height), shot.background)
    slot = (width + 32) // max(len(shot.cast), 1)
    for place, who in enumerate(shot.cast):
        figure = CHARACTERS[who].draw(slot, height, outfit=rng.randrange(3), rng=rng)
        mask = Image.fromarray((np.asarray(figure).min(axis=2) < 240).astype(np.uint8) * 255)
        canvas.paste(figure, (place * slot, 0), mask)
    return canvas


def write_episode(
    path: Path, shots: list[Shot], fps: int = 24, size: tuple[int, int] = (320, 180), seed: int = 0
) -> list[float]:
    """Encode ``shots`` to an H.264 file at ``path``; returns the times (s) where shots begin."""
    import av

    rng = random.Random(seed)
    starts, frame_index = [], 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"g": str(fps * 10), "preset": "veryfast"}  # keyframes every 10 s, not at cuts
        for shot in shots:
            starts.append(frame_index / fps)
            canvas = _shot_canvas(shot, size, rng)
            count = round(shot.seconds * fps)
            for step in range(count):
                offset = round(32 * step / max(count - 1, 1))  # a slow pan across the shot
                image = canvas.crop((offset, 0, offset + size[0], size[1]))
                if shot.dark:
                    image = Image.eval(image, lambda value: value // 16)
                frame = av.VideoFrame.from_image(image)
                for packet in stream.encode(frame):
                    container.mux(packet)
                frame_index += 1
        for packet in stream.encode():
            container.mux(packet)
    return starts
