"""Which checkpoints are scored, in which order, and which stop after part of their images.

``score_checkpoints`` is the loop the evaluate stage runs; the test kit replays synthetic runs through
it too (``lorafactory.testing.metric_tables``), so what the simulations measure is this very code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lorafactory.config import EvaluateSettings
from lorafactory.evaluate.scoring import StepScores
from lorafactory.evaluate.select import Table, keep_count, ruled_out, select_steps

StopsEarly = Callable[[StepScores], bool]
# score(step, stops_early): the step's scores (over fewer images when stops_early said so), or why it failed
ScoreStep = Callable[[int, StopsEarly | None], StepScores | str]


@dataclass
class Scored:
    intervals: dict[int, dict[str, tuple[float, float] | None]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # steps that could not be scored, and why
    ruled: dict[int, str] = field(default_factory=dict)  # steps scored on part of their images only, and why
    done: set[int] = field(default_factory=set)  # every step tried
    images: int = 0  # images scored in all


def look_parts(n: int, every: int) -> list[list[int]]:
    """The suite's ``n`` image indices in the parts a sequential evaluation renders: as few parts as hold at most
    ``every`` images each, part j every p-th image from j, so that each look sees the whole suite evenly; a step
    may stop after any part but the last."""
    parts = -(-n // every)
    return [list(range(j, n, parts)) for j in range(parts)]


def small_parts_warning(e: EvaluateSettings, images: int) -> str | None:
    """Why sequential parts smaller than the render batch leave it part-empty, or None when they do not."""
    if not e.sequential or images <= e.sequential_every or e.batch_size <= e.sequential_every:
        return None
    return (
        f"evaluate.batch_size is {e.batch_size} but sequential evaluation renders parts of at most "
        f"{e.sequential_every} images, so no batch is full; set evaluate.sequential_every = {e.batch_size}"
    )


def coarse_steps(steps: list[int], every: int) -> list[int]:
    """Every ``every``-th checkpoint, and always the last."""
    return sorted(set(steps[every - 1 :: every]) | {steps[-1]})


def refine_steps(steps: list[int], done: set[int], around: list[int], every: int) -> list[int]:
    """The not yet evaluated checkpoints within ``every - 1`` places of the ``around`` steps."""
    index = {step: i for i, step in enumerate(steps)}
    wanted = {steps[j] for s in around for j in range(max(0, index[s] - every + 1), min(len(steps), index[s] + every))}
    return sorted(wanted - done)


def score_checkpoints(table: Table, e: EvaluateSettings, score: ScoreStep, images_each: int) -> Scored:
    """Score the steps of ``table`` (one row each, updated in place with the scores) as ``e`` asks: all or
    coarse-to-fine, and with ``e.sequential`` latest first, each ruled out after a part of its ``images_each``
    images (``look_parts``) when even the top of its intervals could not make it one of the run's kept steps."""
    steps = sorted(table)
    keep = keep_count(len(steps), e.keep)  # what the whole run keeps: a step outside it is ruled out
    result = Scored()
    rounds = [steps] if e.checkpoints == "all" else [coarse_steps(steps, e.coarse_every), None]  # None: refine
    for planned in rounds:
        if planned is None:
            around = select_steps({s: table[s] for s in sorted(result.done)}, e, frozenset(result.ruled)).kept
            planned = refine_steps(steps, result.done, around, e.coarse_every)
        for step in sorted(planned, reverse=e.sequential):  # sequential: the latest set a high bar first
            scored = {s: table[s] for s in sorted(result.done) if s not in result.failed}
            ruled = frozenset(result.ruled)
            result.done.add(step)

            def outside_kept(probe: StepScores) -> bool:  # called at once, within this iteration
                return ruled_out(scored, step, probe.values, probe.intervals, e, keep, ruled)

            scores = score(step, outside_kept if e.sequential else None)
            if isinstance(scores, str):
                result.failed[step] = scores
                continue
            result.images += scores.images
            if scores.images < images_each:
                result.ruled[step] = (
                    f"ruled out after {scores.images} of {images_each} images: even at the top of its "
                    f"95% intervals it would not be among the {keep} kept"
                )
            table[step].update(scores.values)
            result.intervals[step] = scores.intervals
    return result
