"""Synthetic evaluation runs: per-image metric values drawn around known curves, and the evaluation
strategies (every image, sequential, coarse-to-fine) replayed on them through the real selection code.

Fidelity rises then saturates, prompt adherence falls as the LoRA overfits, AI-corruption is flat;
each checkpoint's per-image values carry noise of the size real scorers show. Another ``draw`` of a run
keeps its curves and redraws that noise: the same checkpoints rendered with other seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafactory.config import EvaluateSettings
from lorafactory.evaluate.metrics import bootstrap_interval
from lorafactory.evaluate.schedule import StopsEarly, look_parts, score_checkpoints
from lorafactory.evaluate.scoring import StepScores
from lorafactory.evaluate.select import select_steps

METRICS = ("ccip_recscore", "bikini_plus", "ai_corrupt")
NOISE = {"ccip_recscore": 0.2, "bikini_plus": 0.08, "ai_corrupt": 0.03}
IMAGES = 28  # the built-in prompt suite's images per checkpoint (a dataset's outfit clusters add more)


def _curves(rng: np.random.Generator, checkpoints: int, every: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The checkpoints' steps, and each metric's curve over them (its first draws from ``rng``)."""
    steps = np.arange(every, every * (checkpoints + 1), every, dtype=float)
    position = steps / steps.max()
    middle, rate = rng.uniform(0.2, 0.5), rng.uniform(6, 14)
    return steps, {
        "ccip_recscore": 0.15 + 0.75 / (1 + np.exp(-rate * (position - middle))),
        "bikini_plus": 0.45 - 0.2 * position**2,
        "ai_corrupt": np.full(len(steps), 0.95),
    }


def true_table(seed: int, checkpoints: int = 20, every: int = 100) -> dict[int, dict[str, float | None]]:
    """The metric table ``synthetic_run(seed, ...)`` is drawn around: its noise-free curves (the images' values
    are then clipped to [0, 1], which moves their mean slightly near either bound)."""
    steps, curves = _curves(np.random.default_rng(seed), checkpoints, every)
    return {int(step): {m: float(curves[m][i]) for m in METRICS} for i, step in enumerate(steps)}


def synthetic_run(
    seed: int, checkpoints: int = 20, every: int = 100, images: int = IMAGES, draw: int = 0
) -> dict[int, dict[str, np.ndarray]]:
    """Step -> metric -> the values of its ``images`` images."""
    rng = np.random.default_rng(seed)
    steps, curves = _curves(rng, checkpoints, every)
    if draw:
        rng = np.random.default_rng([seed, draw])
    return {
        int(step): {m: np.clip(curves[m][i] + rng.normal(0, NOISE[m], images), 0, 1) for m in METRICS}
        for i, step in enumerate(steps)
    }


def scored(values: dict[str, np.ndarray], chosen: list[int] | None = None) -> StepScores:
    """A checkpoint's scores and 95% intervals, from all its images or the ``chosen`` ones."""
    picked = {m: values[m] if chosen is None else values[m][chosen] for m in METRICS}
    row: dict[str, float | None] = {m: float(picked[m].mean()) for m in METRICS}
    intervals = {m: bootstrap_interval(list(picked[m]), 400, seed=1) for m in METRICS}
    return StepScores(row, intervals, images=len(picked[METRICS[0]]))


@dataclass
class Outcome:
    best: int
    kept: list[int]
    ruled: set[int]
    images: int  # rendered
    rendered: dict[int, int]  # each scored step's images


def replay(run: dict[int, dict[str, np.ndarray]], e: EvaluateSettings, sequential: bool, coarse: bool) -> Outcome:
    """The evaluate stage's own loop (``score_checkpoints``) and selection on ``run``, with these strategies."""
    e = e.model_copy(update={"sequential": sequential, "checkpoints": "coarse_to_fine" if coarse else "all"})
    images = len(next(iter(run.values()))[METRICS[0]])
    rendered: dict[int, int] = {}

    def score(step: int, stops_early: StopsEarly | None) -> StepScores:
        looks = look_parts(images, e.sequential_every)[:-1] if stops_early is not None else []
        done: list[int] = []
        for part in looks:
            done += part
            scores = scored(run[step], sorted(done))
            if stops_early(scores):
                break
        else:
            scores = scored(run[step])
        rendered[step] = scores.images
        return scores

    table: dict[int, dict[str, float | None]] = {step: {m: None for m in METRICS} for step in run}
    result = score_checkpoints(table, e, score, images)
    selection = select_steps(table, e, frozenset(result.ruled))
    return Outcome(selection.best, selection.kept, set(result.ruled), result.images, rendered)
