"""The 3-stage crop: each person, then her upper body, then her head (enlarged)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from lorafactory.config import PrepareSettings, VisionSettings
from lorafactory.vision.detect import detect


@dataclass(frozen=True)
class Crop:
    group: str  # person, halfbody or head
    suffix: str
    image: Image.Image


def person_crops(image: Image.Image, prepare: PrepareSettings, vision: VisionSettings) -> list[Crop]:
    """One crop per detected person, large enough to use."""
    crops = []
    for index, box in enumerate(detect(image, "person", vision.person_model)):
        body = image.crop((box.x0, box.y0, box.x1, box.y1))
        if min(body.size) >= prepare.min_crop_side:
            crops.append(Crop("person", f"person{index}", body))
    return crops


def head_count(person: Crop, vision: VisionSettings) -> int:
    return len(detect(person.image, "head", vision.head_model))


def inner_crops(person: Crop, prepare: PrepareSettings, vision: VisionSettings) -> list[Crop]:
    """The person's first half-body box and first head box (enlarged by ``head_scale``)."""
    body = person.image
    crops = []
    if "halfbody" in prepare.crops:
        halves = detect(body, "halfbody", vision.halfbody_model)
        if halves:
            half = halves[0]
            crop = body.crop((half.x0, half.y0, half.x1, half.y1))
            if min(crop.size) >= prepare.min_crop_side:
                crops.append(Crop("halfbody", f"{person.suffix}_halfbody", crop))
    if "head" in prepare.crops:
        heads = detect(body, "head", vision.head_model)
        if heads:
            head = heads[0].scaled(prepare.head_scale, body.size)
            crop = body.crop((head.x0, head.y0, head.x1, head.y1))
            if min(crop.size) >= prepare.min_crop_side:
                crops.append(Crop("head", f"{person.suffix}_head", crop))
    return crops


def three_stage(image: Image.Image, prepare: PrepareSettings, vision: VisionSettings) -> list[Crop]:
    """Every person's crop (when ``person`` is among ``prepare.crops``) followed by her inner crops."""
    crops: list[Crop] = []
    for person in person_crops(image, prepare, vision):
        if "person" in prepare.crops:
            crops.append(person)
        crops += inner_crops(person, prepare, vision)
    return crops
