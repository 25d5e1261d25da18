"""Synthetic anime-like characters: distinct palettes and shapes per character, several outfits.

A dataset mixes the main character in varied sizes and aspect ratios with monochrome copies,
near-duplicates and images of other characters, which is what the cleaning chain must sort out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from lorafactory.testing.onnx_graphs import PALETTE


def _rgb(name: str, rng: random.Random, jitter: int = 10) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * 255) + rng.randint(-jitter, jitter))) for c in PALETTE[name])  # type: ignore[return-value]


@dataclass(frozen=True)
class Character:
    """A drawable character: hair and eye colours are fixed; outfits share a main colour."""

    name: str
    hair: str
    eyes: str
    outfit: str
    accents: tuple[str, ...]
    long_hair: bool = True

    def draw(self, width: int, height: int, outfit: int, rng: random.Random) -> Image.Image:
        """The character standing on a near-white background, filling most of the frame."""
        bg = 250 + rng.randint(-3, 3)
        image = Image.new("RGB", (width, height), (bg, bg, bg))
        draw = ImageDraw.Draw(image)
        top, bottom = height * rng.uniform(0.03, 0.3), height * rng.uniform(0.8, 0.98)  # pose and framing vary
        body_h = bottom - top
        cx = width * rng.uniform(0.3, 0.7)
        head_r = min(body_h * 0.11, width * 0.22)
        head_cy = top + head_r * 1.15
        hair = _rgb(self.hair, rng)
        # hair behind the body
        hair_len = body_h * (0.7 if self.long_hair else 0.22)
        draw.rounded_rectangle(
            (cx - head_r * 1.6, head_cy - head_r * 0.2, cx + head_r * 1.6, head_cy + hair_len),
            radius=int(head_r * 0.6),
            fill=hair,
        )
        # body and outfit
        shoulder = head_cy + head_r * 1.1
        main = _rgb(self.outfit, rng)
        accent = _rgb(self.accents[outfit % len(self.accents)], rng)
        if outfit % 3 == 0:  # dress
            draw.polygon(
                [
                    (cx - head_r * 0.9, shoulder),
                    (cx + head_r * 0.9, shoulder),
                    (cx + head_r * 2.0, bottom - body_h * 0.12),
                    (cx - head_r * 2.0, bottom - body_h * 0.12),
                ],
                fill=main,
            )
        elif outfit % 3 == 1:  # shirt and skirt
            mid = shoulder + body_h * 0.3
            draw.rectangle((cx - head_r, shoulder, cx + head_r, mid), fill=main)
            draw.polygon(
                [
                    (cx - head_r, mid),
                    (cx + head_r, mid),
                    (cx + head_r * 1.6, mid + body_h * 0.25),
                    (cx - head_r * 1.6, mid + body_h * 0.25),
                ],
                fill=accent,
            )
        else:  # coat
            draw.rectangle((cx - head_r * 1.2, shoulder, cx + head_r * 1.2, bottom - body_h * 0.15), fill=main)
            draw.rectangle((cx - head_r * 0.15, shoulder, cx + head_r * 0.15, bottom - body_h * 0.15), fill=accent)
        # legs
        skin = _rgb("skin", rng, jitter=4)
        leg_top = bottom - body_h * 0.12
        draw.rectangle((cx - head_r * 0.6, leg_top, cx - head_r * 0.2, bottom), fill=skin)
        draw.rectangle((cx + head_r * 0.2, leg_top, cx + head_r * 0.6, bottom), fill=skin)
        # head, fringe and eyes
        draw.ellipse((cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r), fill=skin)
        draw.chord(
            (cx - head_r * 1.1, head_cy - head_r * 1.15, cx + head_r * 1.1, head_cy + head_r * 0.6),
            180,
            360,
            fill=hair,
        )
        eye = _rgb(self.eyes, rng)
        for side in (-1, 1):
            ex = cx + side * head_r * 0.4
            draw.ellipse(
                (ex - head_r * 0.14, head_cy + head_r * 0.05, ex + head_r * 0.14, head_cy + head_r * 0.4), fill=eye
            )
        return image


CHARACTERS = [
    Character("Akane Hoshino", hair="red", eyes="yellow", outfit="blue", accents=("white", "black", "yellow")),
    Character("Midori Kaze", hair="green", eyes="brown", outfit="purple", accents=("white", "pink", "black")),
    Character("Sora Aoi", hair="cyan", eyes="blue", outfit="brown", accents=("white", "orange")),
    Character("Kiiro Hana", hair="yellow", eyes="green", outfit="pink", accents=("white", "purple", "red")),
]


@dataclass(frozen=True)
class SyntheticImage:
    """An image of the generated set and what it really is, for tests that check the cleaning."""

    filename: str
    character: str
    kind: str  # "main", "monochrome", "near_duplicate", "other"
    tags: tuple[str, ...]


def _size(rng: random.Random, short: tuple[int, int]) -> tuple[int, int]:
    side = rng.randint(*short)
    ratio = rng.choice([1.0, 0.75, 0.66, 0.5, 1.33])
    width, height = (side, int(side / ratio)) if ratio <= 1 else (int(side * ratio), side)
    return width, height


def _tags_for(character: Character, outfit: int) -> tuple[str, ...]:
    outfit_tag = ("dress", "skirt", "coat")[outfit % 3]
    return ("1girl", "solo", f"{character.hair}_hair", f"{character.eyes}_eyes", outfit_tag, "long_hair")


def generate_dataset(
    folder: Path,
    character: Character = CHARACTERS[0],
    count: int = 24,
    seed: int = 0,
    short_side: tuple[int, int] = (160, 320),
    monochrome: int = 3,
    near_duplicates: int = 2,
    others: int = 3,
) -> list[SyntheticImage]:
    """Write a mixed image folder for ``character`` and return what each file really is."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made: list[SyntheticImage] = []
    mains: list[tuple[Image.Image, SyntheticImage]] = []
    for i in range(count):
        outfit = i % len(character.accents)
        image = character.draw(*_size(rng, short_side), outfit=outfit, rng=rng)
        record = SyntheticImage(f"main_{i:03d}.png", character.name, "main", _tags_for(character, outfit))
        image.save(folder / record.filename)
        made.append(record)
        mains.append((image, record))
    for i in range(monochrome):
        image, source = mains[i]
        record = SyntheticImage(f"mono_{i:03d}.png", character.name, "monochrome", source.tags + ("monochrome",))
        ImageOps.grayscale(image).convert("RGB").save(folder / record.filename)
        made.append(record)
    for i in range(near_duplicates):
        image, source = mains[-1 - i]
        w, h = image.size
        record = SyntheticImage(f"dup_{i:03d}.jpg", character.name, "near_duplicate", source.tags)
        image.crop((2, 2, w - 2, h - 2)).filter(ImageFilter.GaussianBlur(0.6)).save(
            folder / record.filename, quality=90
        )
        made.append(record)
    strangers = [c for c in CHARACTERS if c.name != character.name]
    for i in range(others):
        other = strangers[i % len(strangers)]
        record = SyntheticImage(f"other_{i:03d}.png", other.name, "other", _tags_for(other, 0))
        other.draw(*_size(rng, short_side), outfit=0, rng=rng).save(folder / record.filename)
        made.append(record)
    return made
