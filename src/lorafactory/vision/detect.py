"""Person, half-body and head boxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

Kind = Literal["person", "halfbody", "head"]


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int
    label: str
    score: float

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def scaled(self, factor: float, limit: tuple[int, int]) -> Box:
        """The box enlarged ``factor`` times about its centre, clipped to a (width, height) image."""
        cx, cy = (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2
        hw, hh = self.width * factor / 2, self.height * factor / 2
        return Box(
            max(0, int(cx - hw)),
            max(0, int(cy - hh)),
            min(limit[0], int(cx + hw)),
            min(limit[1], int(cy + hh)),
            self.label,
            self.score,
        )


def detect(image: Image.Image, kind: Kind, model_name: str) -> list[Box]:
    """Boxes of ``kind`` in ``image``, highest score first (imgutils' default thresholds)."""
    from imgutils.detect import detect_halfbody, detect_heads, detect_person

    function = {"person": detect_person, "halfbody": detect_halfbody, "head": detect_heads}[kind]
    found = function(image, model_name=model_name)
    boxes = [Box(*map(int, xyxy), label, float(score)) for xyxy, label, score in found]
    return sorted(boxes, key=lambda box: -box.score)
