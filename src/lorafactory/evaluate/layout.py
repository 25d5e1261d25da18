"""Where an evaluation keeps each checkpoint's images and metrics (imported without the model libraries)."""

from __future__ import annotations

from pathlib import Path


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "steps" / f"step-{step:06d}"
