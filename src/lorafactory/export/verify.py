"""Model files are read back whole before they are released: a damaged file never ships."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from lorafactory.errors import StageError, first_line


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a readable model file, or None when every tensor in it loads."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True, map_location="cpu")
        return None
    except Exception as exc:  # noqa: BLE001 - whatever a reader raises, the file is unusable
        return first_line(exc)


def verify_model_files(paths: list[Path], fix: str) -> None:
    """Raise a one-line StageError naming the first damaged file and ``fix``."""
    for path in paths:
        if path.suffix in (".safetensors", ".pt"):
            problem = _problem(path)
            if problem is not None:
                raise StageError(f"{path.name} is damaged: {problem}; {fix}")
