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


def three_stage(image: Image.Image, prepare: PrepareSettings, vision: VisionSettings) -> list[Crop]:
    """Crops of each detected person, her first half-body box and her first head box."""
    crops: list[Crop] = []
    persons = detect(image, "person", vision.person_model)
    for index, person in enumerate(persons):
        body = image.crop((person.x0, person.y0, person.x1, person.y1))
        if min(body.size) < prepare.min_crop_side:
            continue
        if "person" in prepare.crops:
            crops.append(Crop("person", f"person{index}", body))
        if "halfbody" in prepare.crops:
            halves = detect(body, "halfbody", vision.halfbody_model)
            if halves:
                half = halves[0]
                crop = body.crop((half.x0, half.y0, half.x1, half.y1))
                if min(crop.size) >= prepare.min_crop_side:
                    crops.append(Crop("halfbody", f"person{index}_halfbody", crop))
        if "head" in prepare.crops:
            heads = detect(body, "head", vision.head_model)
            if heads:
                head = heads[0].scaled(prepare.head_scale, body.size)
                crop = body.crop((head.x0, head.y0, head.x1, head.y1))
                if min(crop.size) >= prepare.min_crop_side:
                    crops.append(Crop("head", f"person{index}_head", crop))
    return crops
