"""Contact sheets: a grid of a cluster's crops in one PNG, to see at a glance who a cluster is."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps

from lorafactory.workspace import write_bytes_atomic

CELL = (128, 176)  # width, height of one crop's cell
COLUMNS = 8


def contact_sheet(images: Sequence[Path], out: Path, columns: int = COLUMNS) -> Path:
    """Write the crops (each fitted into a cell, on white) as a grid at ``out``; returns ``out``."""
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (CELL[0] * min(columns, max(len(images), 1)), CELL[1] * rows), "white")
    for index, path in enumerate(images):
        with Image.open(path) as image:
            cell = ImageOps.contain(image.convert("RGB"), CELL)
        x = (index % columns) * CELL[0] + (CELL[0] - cell.width) // 2
        y = (index // columns) * CELL[1] + (CELL[1] - cell.height) // 2
        sheet.paste(cell, (x, y))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    return out
