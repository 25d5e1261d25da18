"""The fleet's driver: claims jobs from the durable queue and runs them as Ray tasks.

With no address it starts a local Ray (one machine, no setup); with an address it drives a
cluster. Either way it first checks that every node sees the workspace. Each job runs its
character's pipeline in a Ray worker under a lease the worker renews; if the driver or a worker
dies, the lease runs out and the job is claimed again, so nothing is lost.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorafactory.errors import ConfigError
from lorafactory.fleet.queue import Claim, JobQueue
from lorafactory.fleet.worker import Outcome, run_job
from lorafactory.state import Store

LEASE_S = 120.0
PROBE = ".fleet-probe"


def _read_probe(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_missing_workspace(expected: str, answers: dict[str, str | None]) -> list[str]:
    """The nodes whose answer is not the probe's content (they do not see the same workspace)."""
    return sorted(node for node, seen in answers.items() if seen != expected)


def check_shared_workspace(ray, workspace: Path) -> None:
    """Every alive node must read the probe this driver writes into the workspace: artifacts are
    shared through that folder (a shared filesystem or volume on a cluster)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = workspace / PROBE
    probe.write_text(token)
    reader = ray.remote(num_cpus=0)(_read_probe)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        refs = {
            node.get("NodeManagerAddress", node["NodeID"]): reader.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(probe))
            for node in nodes
        }
        answers = {name: ray.get(ref, timeout=60) for name, ref in refs.items()}
    finally:
        probe.unlink(missing_ok=True)
    missing = nodes_missing_workspace(token, answers)
    if missing:
        raise ConfigError(
            f"node(s) {', '.join(missing)} do not see the workspace {workspace}; mount the same shared "
            "filesystem at that path on every node (or pass -w with a path they all see)"
        )


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
    check_shared_workspace(ray, Path(workspace))
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
            except ray.exceptions.RayError as exc:  # the worker died: back to the queue at once (a job that
                # keeps killing its workers runs out of attempts); the pipeline resumes what it had done
                message = f"worker died: {exc.__class__.__name__}"
                status = queue.fail(claim.id, owner, message, transient=True, backoff=False)
                outcome = Outcome(claim.id, status, message)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(claim, outcome)
