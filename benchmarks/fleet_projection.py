"""Models per day for N GPUs, projected from measured stage times.

Stage times are the medians of the succeeded stages in a state store (any fleet's or run's
database); the GPU stages can be replaced by measurements made elsewhere (``--train-s``,
``--evaluate-s``, e.g. from ``gpu_throughput.py``: max_steps / steps per second). A fleet is bound
either by its GPUs (train + evaluate + the scheduler's overhead per character, one character per
GPU at a time) or by its CPU lanes (crawl + prepare + release); the table says which.

    PYTHONPATH=src python benchmarks/fleet_projection.py --db sqlite:///WORKSPACE/lorafactory.db \
        [--train-s S] [--evaluate-s S] [--overhead-s S] [--cpu-lanes C] [--gpus 1 2 4 8]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

GPU_STAGES, CPU_STAGES = ("train", "evaluate"), ("crawl", "prepare", "release")
DAY = 86_400.0


def stage_medians(url: str) -> tuple[dict[str, float], dict[str, int]]:
    from sqlalchemy import select

    from lorafactory.state import Store
    from lorafactory.state.models import StageExecution, as_utc

    with Store(url).session() as session:
        rows = session.execute(
            select(StageExecution.stage, StageExecution.started_at, StageExecution.finished_at).where(
                StageExecution.status == "succeeded"
            )
        ).all()
    seconds: dict[str, list[float]] = defaultdict(list)
    for stage, started, finished in rows:
        seconds[stage].append((as_utc(finished) - as_utc(started)).total_seconds())
    return {s: statistics.median(v) for s, v in seconds.items()}, {s: len(v) for s, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="state database URL with finished runs")
    parser.add_argument("--train-s", type=float, help="seconds of training per character (replaces the measured)")
    parser.add_argument("--evaluate-s", type=float, help="seconds of evaluation per character")
    parser.add_argument("--overhead-s", type=float, default=0.25, help="scheduler overhead per character")
    parser.add_argument("--cpu-lanes", type=int, default=4, help="CPU phases running at once in the fleet")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    medians, counts = stage_medians(args.db)
    if args.train_s is not None:
        medians["train"], counts["train"] = args.train_s, 0
    if args.evaluate_s is not None:
        medians["evaluate"], counts["evaluate"] = args.evaluate_s, 0
    missing = [s for s in GPU_STAGES + CPU_STAGES if s not in medians]
    if missing:
        raise SystemExit(f"no succeeded {', '.join(missing)} stage in {args.db}; run some characters first")
    for stage in CPU_STAGES + GPU_STAGES:
        source = f"median of {counts[stage]}" if counts[stage] else "given"
        print(f"{stage:9s} {medians[stage]:9.1f} s  ({source})")
    gpu_s = sum(medians[s] for s in GPU_STAGES) + args.overhead_s
    cpu_s = sum(medians[s] for s in CPU_STAGES)
    cpu_bound = args.cpu_lanes * DAY / cpu_s
    print(f"\nper character: {gpu_s:.1f} GPU-seconds, {cpu_s:.1f} CPU-lane seconds ({args.cpu_lanes} lanes)")
    print("GPUs   models/day   bound by")
    for gpus in args.gpus:
        gpu_bound = gpus * DAY / gpu_s
        print(f"{gpus:4d}   {min(gpu_bound, cpu_bound):10.0f}   {'GPUs' if gpu_bound <= cpu_bound else 'CPU lanes'}")


if __name__ == "__main__":
    main()
