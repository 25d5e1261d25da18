"""How much rendering each evaluation strategy saves, and how often it still picks the step that scoring
every image of every checkpoint picks, on synthetic runs (``lorafactory.testing.metric_tables``).

A simulation through the real selection code, not a timing: the same seeds give the same table.

    PYTHONPATH=src python benchmarks/evaluation_budget.py [--runs 200] [--checkpoints 20 40]
"""

from __future__ import annotations

import argparse

from lorafactory.config import load_settings
from lorafactory.testing.metric_tables import replay, scored, synthetic_run

STRATEGIES = {"all": (False, False), "sequential": (True, False), "coarse_to_fine": (False, True)}
STRATEGIES["coarse_to_fine + sequential"] = (True, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[20, 40])
    args = parser.parse_args()
    e = load_settings().evaluate
    print(f"{'checkpoints':>11}  {'strategy':<28}{'same step':>10}{'images':>8}{'apart':>7}")
    for checkpoints in args.checkpoints:
        runs = [synthetic_run(seed, checkpoints) for seed in range(args.runs)]
        truth = [replay(run, e, False, False) for run in runs]
        for name, (sequential, coarse) in STRATEGIES.items():
            same = images = apart = 0
            for run, full in zip(runs, truth):
                outcome = replay(run, e, sequential, coarse)
                same += outcome.best == full.best
                images += outcome.images
                low, high = (
                    scored(run[outcome.best]).intervals["ccip_recscore"],
                    scored(run[full.best]).intervals["ccip_recscore"],
                )
                apart += not (low[0] <= high[1] and high[0] <= low[1])  # RecScore intervals do not overlap
            share = images / sum(t.images for t in truth)
            print(f"{checkpoints:>11}  {name:<28}{same / len(runs):>10.1%}{share:>8.1%}{apart:>7}")


if __name__ == "__main__":
    main()
