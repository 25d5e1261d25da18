"""Synthetic anime episodes: synthetic characters in shots with hard cuts, encoded with PyAV.

Each shot has its own background and cast, drawn once and panned a little every frame (so frames
of a shot differ, as animation does). A shot may be dark (a fade), monochrome (a flashback), or
have a crowd: flat one-colour figures with no detail, as background characters are drawn. A shot
with a ``seed`` is drawn the same wherever it appears (an opening repeated in every episode).
The true cut times come back with the file, for tests that check the shot detector.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lorafactory.testing.onnx_graphs import PALETTE
from lorafactory.testing.synthetic import CHARACTERS

CROWD_COLOURS = ("orange", "green", "purple", "brown", "pink", "blue")
# Light backgrounds for shows whose characters are cropped: the stand-in person detector sees
# everything darker than 90 % white as figure, so these stay above it despite encoding noise.
PALE = ((252, 240, 240), (240, 244, 252), (242, 252, 240), (252, 250, 238), (246, 240, 252))


@dataclass(frozen=True)
class Shot:
    seconds: float
    background: tuple[int, int, int]
    cast: tuple[int, ...] = ()  # indices into ``synthetic.CHARACTERS``
    dark: bool = False
    crowd: int = 0  # flat background figures beside the cast
    monochrome: bool = False
    seed: int | None = None  # draw the shot from this seed, not from the episode's random stream


def _figure_mask(figure: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(figure).min(axis=2) < 240).astype(np.uint8) * 255)


def _shot_canvas(shot: Shot, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """The shot's picture, 32 px wider than the frame for the pan: each figure stands in its own
    slot, with background between neighbours (the stand-in detector separates figures by it)."""
    if shot.seed is not None:
        rng = random.Random(shot.seed)
    width, height = size
    canvas = Image.new("RGB", (width + 32, height), shot.background)
    figures = [*shot.cast, *([None] * shot.crowd)]
    slot = (width + 32) // max(len(figures), 1)
    figure_width = int(slot * 0.6)
    for place, who in enumerate(figures):
        drawn = CHARACTERS[who if who is not None else rng.randrange(len(CHARACTERS))]
        figure = drawn.draw(figure_width, height, outfit=rng.randrange(3), rng=rng)
        mask = _figure_mask(figure)
        if who is None:  # a background character: one flat colour
            flat = tuple(int(c * 255) for c in PALETTE[rng.choice(CROWD_COLOURS)])
            figure = Image.new("RGB", figure.size, flat)
        canvas.paste(figure, (place * slot + (slot - figure_width) // 2, 0), mask)
    if shot.monochrome:
        canvas = ImageOps.grayscale(canvas).convert("RGB")
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


@dataclass(frozen=True)
class SyntheticShow:
    """A show written by ``write_show``: each episode's shots and their start times."""

    episodes: dict[str, tuple[list[Shot], list[float]]]
    size: tuple[int, int]
    opening: int  # shots of the opening, at the start of every episode

    def who(self, episode: str, time: float, box: tuple[int, int, int, int]) -> str:
        """Who a crop shows: a cast index as text, or ``crowd``; from the shot at ``time`` and the box's
        place in it (each figure stands in its own slot; the pan moves them less than half a slot)."""
        shots, starts = self.episodes[episode]
        shot = shots[max(0, bisect.bisect_right(starts, time) - 1)]
        figures = [str(c) for c in shot.cast] + ["crowd"] * shot.crowd
        slot = (self.size[0] + 32) / len(figures)
        centre = (box[0] + box[2]) / 2
        return figures[min(int((centre + 16) // slot), len(figures) - 1)]

    def in_opening(self, episode: str, time: float) -> bool:
        shots, starts = self.episodes[episode]
        return time < starts[self.opening]


SHOW_CAST = ((0,), (1,), (0, 2), (2,), (1, 0), (3,), (0,), (2, 1))
# Consecutive shots alternate between reddish and bluish light backgrounds: a cut between light
# backgrounds is seen by the change of hue, and these hues are far apart.
REDDISH = ((252, 240, 240), (252, 238, 246), (250, 242, 236))
BLUISH = ((240, 244, 252), (236, 242, 250), (244, 240, 252))


def write_show(folder: Path, episodes: int = 3, size: tuple[int, int] = (480, 270)) -> SyntheticShow:
    """Episodes ``ep01.mp4``… : the same two-shot opening, then eight shots of characters 0–3 (3 appears
    once per episode), a dark shot, a crowd of background characters, a monochrome flashback, and a
    shot shown again at the episode's end."""
    opening = [Shot(1.5, REDDISH[0], (0, 1), seed=101), Shot(1.5, BLUISH[0], (2,), seed=102)]
    written = {}
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(episodes):
        shots = [Shot(2.5, PALE[0], cast) for cast in SHOW_CAST]
        shots.insert(3, Shot(1.0, (10, 10, 10), dark=True))
        shots.insert(5, Shot(2.0, PALE[0], crowd=3))
        shots.insert(7, Shot(2.0, PALE[0], (1,), monochrome=True))
        callback = Shot(2.0, PALE[0], (2,), seed=200 + number)  # shown again at the end: near-duplicate frames
        shots = [shots[0], callback, *shots[1:], callback]
        shots = [
            shot if shot.dark else replace(shot, background=(REDDISH, BLUISH)[k % 2][(k // 2 + number) % 3])
            for k, shot in enumerate(shots)
        ]
        name = f"ep{number + 1:02d}"
        shots = opening + shots
        written[name] = (shots, write_episode(folder / f"{name}.mp4", shots, size=size, seed=number))
    return SyntheticShow(written, size, len(opening))


def show_replay(folder: Path, copyright: str, cast: tuple[int, ...] = (0, 1, 2), count: int = 8):
    """A danbooru replay for ``copyright``: ``count`` images of each of ``cast``, tagged as the site
    tags a show's characters (``name_(copyright)``), so the show's character list and reference
    images come from it."""
    from lorafactory.sources.danbooru import character_tag
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage
    from lorafactory.testing.synthetic import generate_dataset

    items = []
    for who in cast:
        drawn = folder / f"character_{who}"
        generate_dataset(drawn, CHARACTERS[who], count=count, seed=10 + who, monochrome=0, near_duplicates=0, others=0)
        tag = f"{character_tag(CHARACTERS[who].name)}_({character_tag(copyright)})"
        for path in sorted(drawn.glob("*.png")):  # one folder: the replay serves files by name
            moved = path.rename(folder / f"{who}_{path.name}")
            items.append(ReplayImage(moved, ["1girl", "solo"], [tag]))
    return DanbooruReplay(items)
