"""The GPU phase's resident workers: one Ray actor per GPU (or per share of one), started for the GPUs the
cluster has or is asked for, and for GPUs that join it later.

A runner takes jobs only once it answers (placed on a node, libraries imported): a runner asked for a GPU no
node has yet waits unplaced, which is the demand an autoscaler (KubeRay's) adds a GPU node for, and never
holds a job meanwhile. A cluster without GPUs (none asked for either) trains on one runner on the CPU, and
keeps doing so: ask for GPUs to wait for GPU nodes instead.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from lorafactory.errors import ConfigError
from lorafactory.fleet.queue import Claim
from lorafactory.fleet.worker import Outcome, import_model_libraries, run_job

RESIZE_EVERY_S = 30.0  # how often the cluster's GPUs are counted again
log = logging.getLogger(__name__)


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
        """Answers once the actor (started, or restarted after a death) can take work."""
        return True


class Runners:
    """The GPU phase's runners: ``idle`` ones take jobs; ``starting`` ones (new, restarting, or waiting for a
    GPU to be placed on) are asked whether they are ready, and join ``idle`` when they answer.

    ``gpus`` asks for runners for that many GPUs whether or not the cluster has them yet; by default, the
    cluster's GPUs when it starts. Either way, every ``resize_s`` seconds (default ``RESIZE_EVERY_S``)
    runners are added for GPUs beyond those."""

    def __init__(
        self,
        ray,
        job: Callable[..., Outcome] = run_job,
        jobs_per_gpu: int = 1,
        gpus: int | None = None,
        resize_s: float | None = None,
    ) -> None:
        if jobs_per_gpu < 1:
            raise ConfigError(f"jobs per GPU is {jobs_per_gpu}; give 1 or more")
        if gpus is not None and gpus < 0:
            raise ConfigError(f"--gpus is {gpus}; give 0 or more")
        self.ray, self.job, self.jobs_per_gpu = ray, job, jobs_per_gpu
        self.resize_s = RESIZE_EVERY_S if resize_s is None else resize_s
        self.idle: list = []
        self.starting: dict = {}  # ready() ref -> actor: no job until it answers
        self.gpus = 0  # the GPUs runners were started for
        self.actors: dict = {}  # actor -> the CPUs it holds
        self._resized = time.monotonic()
        present = self._count_cluster()
        wanted = present if gpus is None else gpus
        if gpus is not None and gpus > present:
            log.info("runners for %d GPUs asked for, %d in the cluster: the rest start as GPUs join", gpus, present)
        if wanted:
            self._start(wanted)
        else:  # without GPUs, one runner trains on the CPU
            self._spawn(num_gpus=0)

    def _count_cluster(self) -> int:
        """The cluster's GPUs; its CPUs are kept in ``cluster_cpus`` (read here, not at every claim)."""
        resources = self.ray.cluster_resources()
        self.cluster_cpus = int(resources.get("CPU", 1))
        return int(resources.get("GPU", 0))

    @property
    def _cpus_left(self) -> int:
        """The cluster's CPUs no runner holds."""
        return self.cluster_cpus - sum(self.actors.values())

    @property
    def cpu_slots(self) -> int:
        """The cluster's CPUs the runners leave to the CPU phases (at least one)."""
        return max(1, self._cpus_left)

    def _spawn(self, num_gpus: float) -> None:
        # a runner holds a CPU while one is left to the CPU phases; a cluster short of CPUs keeps them for those
        actor_cpus = 1 if self._cpus_left > 1 else 0
        options = {"num_gpus": num_gpus, "num_cpus": actor_cpus, "max_restarts": -1, "max_task_retries": 0}
        actor = self.ray.remote(PhaseRunner).options(**options).remote(self.job, warm=self.job is run_job)
        self.actors[actor] = actor_cpus
        self.starting[actor.ready.remote()] = actor

    def _start(self, gpus: int) -> None:
        for _ in range(gpus * self.jobs_per_gpu):
            self._spawn(num_gpus=1 / self.jobs_per_gpu)
        self.gpus += gpus

    def poll(self) -> None:
        """Runners that answered join the idle ones; every ``resize_s``, runners for GPUs that joined."""
        if self.starting:
            answered, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in answered:
                actor = self.starting.pop(ref)
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayError:  # died again while starting: ask again
                    self.starting[actor.ready.remote()] = actor
                    continue
                self.idle.append(actor)
        if self.gpus and time.monotonic() - self._resized >= self.resize_s:
            self._resized = time.monotonic()
            joined = self._count_cluster() - self.gpus
            if joined > 0:
                log.info("%d GPU(s) joined the cluster: %d more runner(s)", joined, joined * self.jobs_per_gpu)
                self._start(joined)

    def returned(self, actor) -> None:
        """A runner's job ended: it takes the next one."""
        self.idle.append(actor)

    def died(self, actor) -> None:
        """A runner died in its job: it restarts itself (``max_restarts``); no job for it until it answers."""
        self.starting[actor.ready.remote()] = actor

    def waiting(self) -> list:
        """The refs of runners not answered yet (to wake the driver when one does)."""
        return list(self.starting)
