"""How much rendering each evaluation strategy saves, and how often it still picks the step that scoring
every image of every checkpoint picks, on synthetic runs (``lorafactory.testing.metric_tables``).

A simulation through the real selection code, not a timing: the same seeds give the same table. Columns:
how often the strategy picks the step that scoring everything picks; the images and the GPU batches
(``--batch`` images each, a part of a sequential evaluation rendered in its own batches) it renders, as a
share of scoring everything; in how many runs the two picks' RecScore intervals do not overlap; and what the
pick is worth: the selection rule's F-beta lost against the step the rule picks on the run's noise-free
curves (``true_table``), its mean and 90th percentile over runs.
The ``rerendered`` row scores everything on another draw of each run's image noise, as rendering the same
checkpoints with other seeds would: how often two full evaluations agree. ``half the checkpoints`` evaluates
every other one (the default evaluation, sequential, of a run saved half as often): half the rendering, and
what that costs the pick.

    PYTHONPATH=src python benchmarks/evaluation_budget.py [--runs 200] [--checkpoints 20 40] [--images 28 37]
        [--every 8] [--batch 8]
"""

from __future__ import annotations

import argparse
import math
import statistics

from lorafactory.config import EvaluateSettings, load_settings
from lorafactory.evaluate.schedule import look_parts
from lorafactory.evaluate.select import select_steps
from lorafactory.testing.metric_tables import Outcome, replay, scored, synthetic_run, true_table


def strategies(e: EvaluateSettings, images: int, every: int) -> dict[str, tuple[EvaluateSettings, bool, bool, bool]]:
    """Name -> (settings, sequential, coarse-to-fine, every other checkpoint only)."""
    half = e.model_copy(update={"sequential_every": math.ceil(images / 2)})
    parts = e.model_copy(update={"sequential_every": every})
    return {
        "all": (e, False, False, False),
        f"sequential, parts of {every}": (parts, True, False, False),
        "sequential, one look at half": (half, True, False, False),
        "coarse_to_fine": (e, False, True, False),
        f"coarse_to_fine + sequential {every}": (parts, True, True, False),
        f"half the checkpoints, sequential {every}": (parts, True, False, True),
    }


def every_other(run: dict) -> dict:
    """The run as one saved half as often: its 2nd, 4th, ... checkpoints (the last one among them)."""
    steps = sorted(run)
    return {step: run[step] for step in steps[len(steps) % 2 :: 2]}


def batches(outcome: Outcome, e: EvaluateSettings, images: int, sequential: bool, batch: int) -> int:
    """GPU batches rendered: each part of a sequential evaluation in batches of its own."""
    parts = [len(part) for part in look_parts(images, e.sequential_every)] if sequential else [images]
    total = 0
    for left in outcome.rendered.values():
        for size in parts:
            if left <= 0:
                break
            total += math.ceil(min(size, left) / batch)
            left -= size
    return total


def sequential_share(e: EvaluateSettings, images: int, checkpoints: int, runs: int = 100) -> float:
    """The share of a full evaluation's GPU batches that ``e``'s sequential evaluation renders, on ``runs``
    synthetic runs of ``checkpoints`` with ``images`` each (batches of ``e.batch_size``)."""
    full = e.model_copy(update={"sequential": False})
    rendered = every = 0
    for seed in range(runs):
        run = synthetic_run(seed, checkpoints, images=images)
        rendered += batches(replay(run, e, True, False), e, images, True, e.batch_size)
        every += batches(replay(run, full, False, False), full, images, False, e.batch_size)
    return rendered / every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--images", type=int, nargs="+", default=[28, 37], help="images per checkpoint")
    parser.add_argument("--every", type=int, default=load_settings().evaluate.sequential_every)
    parser.add_argument("--batch", type=int, default=load_settings().evaluate.batch_size)
    args = parser.parse_args()
    base = load_settings().evaluate
    print(
        f"{'images':>6}{'checkpoints':>12}  {'strategy':<38}{'same step':>10}{'images':>8}{'batches':>8}{'apart':>7}"
        f"{'fβ lost':>9}{'p90':>7}"
    )
    for images in args.images:
        for checkpoints in args.checkpoints:
            runs = [synthetic_run(seed, checkpoints, images=images) for seed in range(args.runs)]
            truth = [replay(run, base, False, False) for run in runs]
            ideal = [select_steps(true_table(seed, checkpoints), base) for seed in range(args.runs)]
            full_batches = sum(batches(t, base, images, False, args.batch) for t in truth)
            rows = {
                "rerendered": [
                    (replay(synthetic_run(seed, checkpoints, images=images, draw=1), base, False, False), base, False)
                    for seed in range(args.runs)
                ]
            }
            for name, (e, sequential, coarse, halved) in strategies(base, images, args.every).items():
                rows[name] = [
                    (replay(every_other(run) if halved else run, e, sequential, coarse), e, sequential) for run in runs
                ]
            for name, outcomes in rows.items():
                same = rendered = batched = apart = 0
                lost = []
                for run, full, best, (outcome, e, sequential) in zip(runs, truth, ideal, outcomes):
                    lost.append(best.scores[best.best] - best.scores[outcome.best])
                    same += outcome.best == full.best
                    rendered += outcome.images
                    batched += batches(outcome, e, images, sequential, args.batch)
                    low, high = (
                        scored(run[outcome.best]).intervals["ccip_recscore"],
                        scored(run[full.best]).intervals["ccip_recscore"],
                    )
                    apart += not (low[0] <= high[1] and high[0] <= low[1])  # RecScore intervals do not overlap
                share, batch_share = rendered / sum(t.images for t in truth), batched / full_batches
                print(
                    f"{images:>6}{checkpoints:>12}  {name:<38}{same / len(runs):>10.1%}{share:>8.1%}"
                    f"{batch_share:>8.1%}{apart:>7}{statistics.fmean(lost):>9.4f}"
                    f"{statistics.quantiles(lost, n=10)[-1]:>7.3f}"
                )


if __name__ == "__main__":
    main()
