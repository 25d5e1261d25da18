"""The fleet's driver: claims job phases from the durable queue and runs them on Ray.

With no address it starts a local Ray (one machine, no setup); with an address it drives a
cluster. Either way it first checks that every node sees the workspace. Each phase runs in a Ray
worker under a lease the worker renews; if a worker dies its phase goes back to the queue at once,
and if the driver dies the leases run out and the phases are claimed again, so nothing is lost.
"""

from __future__ import annotations

import itertools
import logging
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
from lorafactory.fleet.worker import Outcome, import_model_libraries, run_job
from lorafactory.state import Store

PROBE = ".fleet-probe"
log = logging.getLogger(__name__)


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


class PhaseRunner:
    """A resident worker for the GPU phase (``jobs_per_gpu`` per GPU): its process, with the libraries it
    has imported and the evaluation pipeline it keeps (``evaluate.resident``), serves job after job. With
    ``warm``, it imports the model phase's libraries as it starts (and restarts), before its first job."""

    def __init__(self, job: Callable[..., Outcome], warm: bool = False) -> None:
        self.job = job
        if warm:
            try:
                import_model_libraries()
            except Exception as exc:  # noqa: BLE001 - never kill the runner: its first job meets it and says why
                log.warning("the model phase's libraries did not import ahead of its jobs: %s", exc)

    def run(self, workspace_root: str, db_url: str, claim: Claim, owner: str, lease_s: float) -> Outcome:
        return self.job(workspace_root, db_url, claim, owner, lease_s)

    def ready(self) -> bool:
        """Answers once the actor (restarted after a death) can take work."""
        return True


@dataclass
class Lanes:
    """Where phases run: GPU phases on resident actors, CPU phases as Ray tasks on free CPUs."""

    actors: list
    cpu_slots: int
    cpu_task: object
    budget: object


def _recover(ray, recovering: dict, idle: list) -> None:
    """Actors that answer again go back to work; one still restarting is asked again."""
    if not recovering:
        return
    answered, _ = ray.wait(list(recovering), num_returns=len(recovering), timeout=0)
    for ref in answered:
        actor = recovering.pop(ref)
        try:
            ray.get(ref)
            idle.append(actor)
        except ray.exceptions.RayError:
            recovering[actor.ready.remote()] = actor


def _lanes(ray, gpus: int, cpus: int, job: Callable[..., Outcome] = run_job, jobs_per_gpu: int = 1) -> Lanes:
    if jobs_per_gpu < 1:
        raise ConfigError(f"jobs per GPU is {jobs_per_gpu}; give 1 or more")
    runners = gpus * jobs_per_gpu if gpus else 1  # without GPUs, one runner trains on the CPU
    actor_cpus = 1 if cpus > runners else 0  # a machine short of CPUs keeps them for the CPU phases
    runner = ray.remote(PhaseRunner).options(
        num_gpus=1 / jobs_per_gpu if gpus else 0, num_cpus=actor_cpus, max_restarts=-1, max_task_retries=0
    )
    actors = [runner.remote(job, warm=job is run_job) for _ in range(runners)]  # a benchmark's job: no warm-up
    cpu_slots = max(1, cpus - actor_cpus * len(actors))
    task = ray.remote(job).options(num_cpus=1, num_gpus=0, max_retries=0)
    return Lanes(actors, cpu_slots, task, fleet_budget(ray))


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
) -> FleetReport:
    """Run queued jobs on Ray until the queue is empty (``until_empty``) or for ever.

    GPU phases (train, evaluate) run on resident actors, ``jobs_per_gpu`` sharing each GPU (more than one
    keeps a GPU busy while each trainer's host prepares its next step); CPU phases (crawl, prepare,
    release, publish) run as tasks on the CPUs left, at most ``crawl_ahead`` datasets (default: two
    per GPU job, at least 4) waiting for a GPU at a time, so crawls stay just ahead of training.
    ``job`` runs one claimed phase in a worker (``fleet.worker.run_job``; a benchmark passes its own).
    """
    ray = connect(address, num_cpus, num_gpus)
    check_shared_workspace(ray, Path(workspace))
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    lanes = _lanes(ray, gpus, cpus, job, jobs_per_gpu)
    ahead = crawl_ahead if crawl_ahead is not None else max(4, 2 * gpus * jobs_per_gpu)
    queue = JobQueue(Store(db_url))
    me = f"{socket.gethostname()}:{os.getpid()}"
    idle = list(lanes.actors)
    in_flight: dict = {}  # object ref -> (claim, owner, actor or None)
    recovering: dict = {}  # ready() ref -> an actor whose last job killed it: no job until it answers
    report = FleetReport()
    claims = itertools.count()

    def claim(phases: tuple[str, ...]) -> tuple[Claim, str] | None:
        owner = f"{me}:{next(claims)}"  # the lease holder: this driver's n-th claim, renewed by its worker
        found = queue.claim(owner, lease_s, phases)
        return None if found is None else (found, owner)

    while True:
        _recover(ray, recovering, idle)
        while idle and (got := claim(GPU_PHASES)):
            actor = idle.pop()
            in_flight[actor.run.remote(str(workspace), db_url, *got, lease_s)] = (*got, actor)
        cpu_busy = sum(1 for *_, actor in in_flight.values() if actor is None)
        while cpu_busy < lanes.cpu_slots:
            phases = CPU_PHASES if queue.waiting("model") < ahead else tuple(p for p in CPU_PHASES if p != "dataset")
            got = claim(phases)
            if got is None:
                break
            in_flight[lanes.cpu_task.remote(str(workspace), db_url, *got, lease_s, lanes.budget)] = (*got, None)
            cpu_busy += 1
        if not in_flight:
            if until_empty and not queue.pending():
                return report
            time.sleep(poll_s)  # jobs waiting out a backoff, an actor restarting, or (with --forever) none yet
            continue
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
        for ref in done:
            claimed, owner, actor = in_flight.pop(ref)
            try:
                outcome = ray.get(ref)
                if actor is not None:
                    idle.append(actor)
            except ray.exceptions.RayError as exc:  # the worker died: back to the queue at once (a job that
                # keeps killing its workers runs out of attempts); the pipeline resumes what it had done
                if actor is not None:  # it restarts itself (max_restarts); no job for it until it answers
                    recovering[actor.ready.remote()] = actor
                message = f"worker died: {exc.__class__.__name__}"
                status = queue.fail(claimed.id, owner, message, transient=True, backoff=False, crashed=True)
                outcome = Outcome(claimed.id, status, message, claimed.phase)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(claimed, outcome)
