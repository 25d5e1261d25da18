"""Exact resume: everything that decides the next training step, saved atomically at each checkpoint.

The state holds the trainable weights, optimizer, scheduler and grad scaler, every RNG (Python's
caption/data RNG, NumPy, torch CPU and CUDA, the noise generator), the rest of the epoch's batch
plan and the bucket leftovers waiting for the next one, the losses so far and the checkpoints already
written. It records the train settings and a fingerprint of the dataset it was made with: resuming with
anything else is refused with an error that names what differs.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lorafactory.errors import StageError
from lorafactory.workspace import write_bytes_atomic

STATE_DIR = "state"


@dataclass
class LoopPosition:
    """The loop's position: what the next step starts from."""

    step: int = 0
    epoch: int = 0  # batch plans started (with repeats, one plan is one epoch)
    plan: list[list[int]] = field(default_factory=list)
    waiting: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # leftovers for full batches
    losses: list[float] = field(default_factory=list)
    checkpoints: dict[int, str] = field(default_factory=dict)
    validation: dict[int, dict[str, float]] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)  # the steps later sessions started from


def _rng_states(rng: random.Random, generator: torch.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": rng.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "noise": generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


@dataclass
class Stateful:
    """The live objects whose state a checkpoint saves and a resume restores."""

    trainables: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    rng: random.Random
    generator: torch.Generator


def save_state(out_dir: Path, made_with: dict[str, Any], live: Stateful, position: LoopPosition) -> None:
    """Save the state; ``made_with`` (JSON: the settings and data it trains with) goes beside it."""
    payload = {
        "trainables": {name: tensor.detach().cpu().clone() for name, tensor in live.trainables.items()},
        "optimizer": live.optimizer.state_dict(),
        "scheduler": live.scheduler.state_dict(),
        "scaler": live.scaler.state_dict() if live.scaler is not None else None,
        "rng": _rng_states(live.rng, live.generator),
        "position": position,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    folder = out_dir / STATE_DIR
    write_bytes_atomic(folder / "state.pt", buffer.getvalue())
    write_bytes_atomic(folder / "state.json", json.dumps({**made_with, "step": position.step}).encode())


def saved_state(out_dir: Path) -> dict[str, Any] | None:
    """What the saved state was made with, and its ``step``; None when there is none."""
    try:
        meta = json.loads((out_dir / STATE_DIR / "state.json").read_text())
        int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_state(out_dir: Path, misfit: Callable[[dict[str, Any]], str | None], live: Stateful) -> LoopPosition:
    """Restore the saved state into ``live``; ``misfit`` says why what it was made with (``saved_state``) is
    not what this run trains with, which refuses it."""
    meta = saved_state(out_dir)
    if meta is None:
        raise StageError(f"no saved training state in {out_dir}")
    why = misfit(meta)
    if why is not None:
        raise StageError(
            f"the saved training state in {out_dir / STATE_DIR} was made with {why}; "
            "restore them, or rerun with --force train to start over"
        )
    try:
        payload = torch.load(out_dir / STATE_DIR / "state.pt", weights_only=False)  # ours: includes RNG tuples
        with torch.no_grad():
            for name, tensor in live.trainables.items():
                tensor.copy_(payload["trainables"][name])
        live.optimizer.load_state_dict(payload["optimizer"])
        live.scheduler.load_state_dict(payload["scheduler"])
    except Exception as exc:  # noqa: BLE001 - truncated or garbled: whatever torch raises
        raise StageError(
            f"the saved training state in {out_dir / STATE_DIR} is damaged ({exc.__class__.__name__}); "
            "rerun with --force train to start over"
        ) from exc
    if live.scaler is not None and payload["scaler"] is not None:
        live.scaler.load_state_dict(payload["scaler"])
    states = payload["rng"]
    live.rng.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    live.generator.set_state(states["noise"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    return payload["position"]
