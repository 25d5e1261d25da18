"""Pictures of an evaluation: metrics against step (with confidence bands and the kept steps
marked) and a preview grid per checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from lorafactory.workspace import write_bytes_atomic


def metrics_plot(
    table: dict[int, dict[str, float | None]],
    intervals: dict[int, dict[str, tuple[float, float] | None]],
    labels: dict[str, str],
    kept: list[int],
    path: Path,
) -> Path:
    """One panel per metric that has any value; the best step in red, the other kept steps dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in labels if any(row.get(m) is not None for row in table.values())]
    columns = min(3, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        steps = sorted(s for s, row in table.items() if row.get(metric) is not None)
        ax.plot(steps, [table[s][metric] for s in steps], marker="o", markersize=3, linewidth=1.2)
        banded = [s for s in steps if intervals.get(s, {}).get(metric)]
        if banded:
            ax.fill_between(
                banded,
                [intervals[s][metric][0] for s in banded],
                [intervals[s][metric][1] for s in banded],
                alpha=0.25,
            )
        for rank, step in enumerate(kept):
            ax.axvline(step, color="red" if rank == 0 else "gray", linestyle="-" if rank == 0 else "--", linewidth=1)
        ax.set_title(labels[metric], fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    if kept:
        figure.suptitle(
            f"best step {kept[0]} (red); also kept: {', '.join(map(str, kept[1:])) or 'none'}", fontsize=10
        )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def preview_grid(images: list[tuple[str, Image.Image]], path: Path, cell: int = 256, columns: int = 6) -> Path:
    """The images tiled in a grid (each scaled to fit ``cell``), each captioned with its name."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    caption = 14
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, image) in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption)
        thumb = image.convert("RGB")
        thumb.thumbnail((cell, cell))
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.text((x + 3, y + cell + 1), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
