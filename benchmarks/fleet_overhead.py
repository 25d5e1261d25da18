"""Scheduler overhead: N characters whose phases do no work, through the real fleet on a local Ray
(the declared GPU routes the model phase to its resident worker), on SQLite and on PostgreSQL.

Every job still goes through everything but the stages themselves: three claims (dataset, model,
release), a Ray task or actor call for each, the worker's lease renewal, settings validation and
the hand-over to the next phase. The contenders alternate, each run on a fresh database; the table
gives the median and spread of wall time per character, characters per second, and the driver's
process CPU time (Ray workers' CPU is not included).

    PYTHONPATH=src python benchmarks/fleet_overhead.py [CHARACTERS] [REPEATS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path


def no_work(workspace_root, db_url, claim, owner, lease_s, budget=None):
    """The fleet's job with phases that do nothing (everything around them is the real code)."""
    from lorafactory.fleet.worker import run_job

    return run_job(workspace_root, db_url, claim, owner, lease_s, budget, run_phase=lambda *args: None)


def one_run(ray, url: str, characters: int) -> tuple[float, float]:
    from lorafactory.config import load_settings, to_toml, tomllib
    from lorafactory.fleet.queue import JobQueue
    from lorafactory.fleet.scheduler import run_fleet
    from lorafactory.state import Store

    settings = tomllib.loads(to_toml(load_settings(preset="tiny-demo", overrides=['character.name="X"'])))
    queue = JobQueue(Store(url))
    for index in range(characters):
        queue.add(f"c{index}", f"C{index}", settings)
    workspace = Path(tempfile.mkdtemp(prefix="lorafactory-fleet-bench-"))
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_fleet(workspace, url, poll_s=0.05, job=no_work)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert report.counts == {"done": characters}, report.counts
    return wall, cpu


def main(characters: int, repeats: int) -> None:
    import ray

    from lorafactory.testing.postgres import LocalPostgres, server_binaries

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[tuple[float, float]]] = {"sqlite": [], "postgresql": []}
    with LocalPostgres() if server_binaries() else _absent() as server:
        for round_ in range(repeats):
            order = ["sqlite", "postgresql"] if round_ % 2 == 0 else ["postgresql", "sqlite"]
            for backend in order:
                if backend == "postgresql" and server is None:
                    continue
                if backend == "sqlite":
                    url = f"sqlite:///{tempfile.mkdtemp(prefix='lorafactory-fleet-bench-')}/state.db"
                else:
                    url = server.new_database("bench")
                wall, cpu = one_run(ray, url, characters)
                results[backend].append((wall, cpu))
                print(f"round {round_ + 1} {backend:10s} {wall:7.2f} s wall  {cpu:6.2f} s driver CPU", flush=True)
    ray.shutdown()
    print(f"\n{characters} characters, no-op phases (3 claims each), {repeats} runs per backend")
    print("backend      per character (median, min-max)      characters/s   driver CPU per character")
    for backend, runs in results.items():
        if not runs:
            continue
        per = [wall / characters for wall, _ in runs]
        cpu = statistics.median(c / characters for _, c in runs)
        print(
            f"{backend:10s}   {statistics.median(per) * 1000:7.1f} ms ({min(per) * 1000:.1f}-{max(per) * 1000:.1f})"
            f"           {characters / statistics.median(w for w, _ in runs):7.1f}        {cpu * 1000:6.1f} ms"
        )


class _absent:
    def __enter__(self):
        print("PostgreSQL server binaries not installed: SQLite only")

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 1000, int(args[1]) if len(args) > 1 else 3)
