"""The fleet's driver: claims jobs from the durable queue and runs them as Ray tasks.

With no address it starts a local Ray (one machine, no setup); with an address it drives a
cluster. Each job runs its character's pipeline in a Ray worker under a lease the worker renews;
if the driver or a worker dies, the lease runs out and the job is claimed again, so nothing is lost.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorafactory.fleet.queue import Claim, JobQueue
from lorafactory.fleet.worker import Outcome, run_job
from lorafactory.state import Store

LEASE_S = 120.0


@dataclass
class FleetReport:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(outcome.status for outcome in self.outcomes)


def _connect(address: str | None, num_cpus: int | None):
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def run_fleet(
    workspace: Path,
    db_url: str,
    address: str | None = None,
    until_empty: bool = True,
    num_cpus: int | None = None,
    lease_s: float = LEASE_S,
    poll_s: float = 2.0,
    on_outcome: Callable[[Claim, Outcome], None] | None = None,
) -> FleetReport:
    """Run queued jobs on Ray, as many at once as the cluster has slots (one per GPU, or per CPU
    without GPUs), until the queue is empty (``until_empty``) or for ever."""
    ray = _connect(address, num_cpus)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    task = ray.remote(run_job).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=0)
    queue = JobQueue(Store(db_url))
    me = f"{socket.gethostname()}:{os.getpid()}"
    in_flight: dict = {}
    report = FleetReport()
    claims = itertools.count()
    while True:
        while len(in_flight) < slots:
            owner = f"{me}:{next(claims)}"  # the lease holder: this driver's n-th claim, renewed by its worker
            claim = queue.claim(owner, lease_s)
            if claim is None:
                break
            in_flight[task.remote(str(workspace), db_url, claim, owner, lease_s)] = (claim, owner)
        if not in_flight:
            if until_empty:
                return report
            time.sleep(poll_s)
            continue
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
        for ref in done:
            claim, owner = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker process died: the job goes back to the queue
                message = f"worker died: {exc.__class__.__name__}"
                outcome = Outcome(claim.id, queue.fail(claim.id, owner, message, transient=True), message)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(claim, outcome)
