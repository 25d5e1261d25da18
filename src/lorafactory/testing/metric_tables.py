"""Synthetic evaluation runs: per-image metric values drawn around known curves, and the evaluation
strategies (every image, sequential, coarse-to-fine) replayed on them through the real selection code.

Fidelity rises then saturates, prompt adherence falls as the LoRA overfits, AI-corruption is flat;
each checkpoint's per-image values carry noise of the size real scorers show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafactory.config import EvaluateSettings
from lorafactory.evaluate.evaluator import coarse_steps, refine_steps
from lorafactory.evaluate.metrics import bootstrap_interval
from lorafactory.evaluate.select import keep_count, ruled_out, select_steps

METRICS = ("ccip_recscore", "bikini_plus", "ai_corrupt")
NOISE = {"ccip_recscore": 0.2, "bikini_plus": 0.08, "ai_corrupt": 0.03}
IMAGES = 28  # the default prompt suite's images per checkpoint
Row = dict[str, float | None]
Intervals = dict[str, tuple[float, float] | None]


def synthetic_run(seed: int, checkpoints: int = 20, every: int = 100) -> dict[int, dict[str, np.ndarray]]:
    """Step -> metric -> the values of its ``IMAGES`` images."""
    rng = np.random.default_rng(seed)
    steps = np.arange(every, every * (checkpoints + 1), every, dtype=float)
    position = steps / steps.max()
    middle, rate = rng.uniform(0.2, 0.5), rng.uniform(6, 14)
    curves = {
        "ccip_recscore": 0.15 + 0.75 / (1 + np.exp(-rate * (position - middle))),
        "bikini_plus": 0.45 - 0.2 * position**2,
        "ai_corrupt": np.full(len(steps), 0.95),
    }
    return {
        int(step): {m: np.clip(curves[m][i] + rng.normal(0, NOISE[m], IMAGES), 0, 1) for m in METRICS}
        for i, step in enumerate(steps)
    }


def scored(values: dict[str, np.ndarray], half: bool = False) -> tuple[Row, Intervals]:
    """A checkpoint's row and 95% intervals, from all its images or every other one (``half``)."""
    chosen = slice(0, None, 2) if half else slice(None)
    row: Row = {m: float(values[m][chosen].mean()) for m in METRICS}
    return row, {m: bootstrap_interval(list(values[m][chosen]), 400, seed=1) for m in METRICS}


@dataclass
class Outcome:
    best: int
    kept: list[int]
    ruled: set[int]
    images: int  # rendered


def replay(run: dict[int, dict[str, np.ndarray]], e: EvaluateSettings, sequential: bool, coarse: bool) -> Outcome:
    """What the evaluator does on ``run``: the same rounds, order and ruling out, with the real rule."""
    steps = sorted(run)
    keep = keep_count(len(steps), e.keep)
    table: dict[int, Row] = {}
    ruled: set[int] = set()
    done: set[int] = set()
    images = 0
    for planned in [coarse_steps(steps, e.coarse_every), None] if coarse else [steps]:
        if planned is None:
            around = select_steps({s: table[s] for s in sorted(done)}, e, frozenset(ruled)).kept
            planned = refine_steps(steps, done, around, e.coarse_every)
        for step in sorted(planned, reverse=sequential):
            before = dict(table)
            done.add(step)
            if sequential:
                probe, intervals = scored(run[step], half=True)
                if ruled_out(before, step, probe, intervals, e, keep, frozenset(ruled)):
                    ruled.add(step)
                    table[step], images = probe, images + (IMAGES + 1) // 2
                    continue
            table[step], images = scored(run[step])[0], images + IMAGES
    selection = select_steps(table, e, frozenset(ruled))
    return Outcome(selection.best, selection.kept, ruled, images)
