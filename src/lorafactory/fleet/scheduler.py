"""The fleet's driver: claims job phases from the durable queue and runs them on Ray.

With no address it starts a local Ray (one machine, no setup); with an address it drives a
cluster. Either way it first checks that every node sees the workspace. Each phase runs in a Ray
worker under a lease the worker renews; if a worker dies its phase goes back to the queue at once,
and if the driver dies the leases run out and the phases are claimed again, so nothing is lost.
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
from lorafactory.fleet.budget import fleet_budget
from lorafactory.fleet.connect import connect
from lorafactory.fleet.phases import CPU_PHASES, GPU_PHASES
from lorafactory.fleet.queue import LEASE_S, Claim, JobQueue
from lorafactory.fleet.runners import Runners
from lorafactory.fleet.worker import Outcome, run_job
from lorafactory.state import Store

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
        """How each finished, retried or failed job phase ended (phases handed on are not counted)."""
        return Counter(outcome.status for outcome in self.outcomes if outcome.next_phase is None)


def run_fleet(
    workspace: Path,
    db_url: str,
    address: str | None = None,
    until_empty: bool = True,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    lease_s: float = LEASE_S,
    poll_s: float = 2.0,
    crawl_ahead: int | None = None,
    on_outcome: Callable[[Claim, Outcome], None] | None = None,
    job: Callable[..., Outcome] = run_job,
    jobs_per_gpu: int = 1,
    gpus: int | None = None,
) -> FleetReport:
    """Run queued jobs on Ray until the queue is empty (``until_empty``) or for ever.

    GPU phases (train, evaluate) run on resident actors, ``jobs_per_gpu`` sharing each GPU (more than one
    keeps a GPU busy while each trainer's host prepares its next step); CPU phases (crawl, prepare,
    release, publish) run as tasks on the CPUs left, at most ``crawl_ahead`` datasets (default: two
    per GPU job, at least 4) waiting for a GPU at a time, so crawls stay just ahead of training.
    ``gpus`` starts runners for that many GPUs whether the cluster has them yet or not (an autoscaler adds
    nodes for the ones waiting); by default the cluster's, and runners are added for GPUs that join it.
    ``job`` runs one claimed phase in a worker (``fleet.worker.run_job``; a benchmark passes its own).
    """
    ray = connect(address, num_cpus, num_gpus)
    check_shared_workspace(ray, Path(workspace))
    runners = Runners(ray, job, jobs_per_gpu, gpus)
    cpu_task = ray.remote(job).options(num_cpus=1, num_gpus=0, max_retries=0)
    budget = fleet_budget(ray)
    queue = JobQueue(Store(db_url))
    me = f"{socket.gethostname()}:{os.getpid()}"
    in_flight: dict = {}  # object ref -> (claim, owner, runner or None)
    report = FleetReport()
    claims = itertools.count()

    def claim(phases: tuple[str, ...]) -> tuple[Claim, str] | None:
        owner = f"{me}:{next(claims)}"  # the lease holder: this driver's n-th claim, renewed by its worker
        found = queue.claim(owner, lease_s, phases)
        return None if found is None else (found, owner)

    while True:
        runners.poll()
        while runners.idle and (got := claim(GPU_PHASES)):
            actor = runners.idle.pop()
            in_flight[actor.run.remote(str(workspace), db_url, *got, lease_s)] = (*got, actor)
        cpu_busy = sum(1 for *_, actor in in_flight.values() if actor is None)
        ahead = crawl_ahead if crawl_ahead is not None else max(4, 2 * len(runners.actors))
        while cpu_busy < runners.cpu_slots:
            phases = CPU_PHASES if queue.waiting("model") < ahead else tuple(p for p in CPU_PHASES if p != "dataset")
            got = claim(phases)
            if got is None:
                break
            in_flight[cpu_task.remote(str(workspace), db_url, *got, lease_s, budget)] = (*got, None)
            cpu_busy += 1
        if not in_flight:
            if until_empty and not queue.pending():
                return report
            if runners.starting:  # GPU jobs may wait for a runner to start: wake when one does
                ray.wait(runners.waiting(), num_returns=1, timeout=poll_s)
            else:  # jobs waiting out a backoff, or (with --forever) none yet
                time.sleep(poll_s)
            continue
        done, _ = ray.wait([*in_flight, *runners.waiting()], num_returns=1, timeout=poll_s)
        for ref in (ref for ref in done if ref in in_flight):  # a runner that answered joins at the next poll
            claimed, owner, actor = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
                if actor is not None:
                    runners.returned(actor)
            except ray.exceptions.RayError as exc:  # the worker died: back to the queue at once (a job that
                # keeps killing its workers runs out of attempts); the pipeline resumes what it had done
                if actor is not None:
                    runners.died(actor)
                message = f"worker died: {exc.__class__.__name__}"
                status = queue.fail(claimed.id, owner, message, transient=True, backoff=False, crashed=True)
                outcome = Outcome(claimed.id, status, message, claimed.phase)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(claimed, outcome)
