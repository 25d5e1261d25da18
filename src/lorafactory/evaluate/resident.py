"""The base pipeline kept loaded between evaluations in one process.

A fleet's GPU worker evaluates character after character on the same base model, and the quality
gate's retrain evaluates again in the same run: loading the pipeline is then the slowest part of
a short evaluation. One pipeline is kept, in host memory between evaluations so that training has
the whole GPU; it is handed out again only for the same base model file, dtype and config, and
only after an evaluation that ended cleanly (every checkpoint's adapter unloaded).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lorafactory.train.model import load_pipeline

_kept: dict[tuple, Any] = {}


def _key(base_model: str, dtype: torch.dtype, config: str, compiled: str) -> tuple:
    path = Path(base_model).expanduser()
    stamp = path.stat().st_mtime_ns if path.exists() else None  # a model replaced on disk is loaded anew
    return (base_model, stamp, str(dtype), config, compiled)


@contextmanager
def base_pipeline(
    base_model: str, dtype: torch.dtype, config: str, device: torch.device, compiled: str = ""
) -> Iterator[Any]:
    """The base model's pipeline for one evaluation: the kept one when it matches, else freshly loaded.
    ``compiled`` names the backend its UNet's blocks are compiled with (empty: not compiled), so that an
    evaluation without ``evaluate.compile`` never gets a compiled one, nor one with another backend."""
    key = _key(base_model, dtype, config, compiled)
    pipe = _kept.pop(key, None)
    _kept.clear()  # one at most: another base model's pipeline is dropped
    if pipe is None:
        pipe = load_pipeline(base_model, dtype, config)
    yield pipe  # an evaluation that raises leaves nothing kept
    if device.type != "cpu":
        pipe.to("cpu")
    _kept[key] = pipe


def forget() -> None:
    """Drop the kept pipeline (its memory returns once nothing else holds it)."""
    _kept.clear()
