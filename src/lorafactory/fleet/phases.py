"""The pipeline as the fleet runs it: phases claimed one after another, each on its kind of worker.

Crawling and preparing a dataset, releasing and publishing need CPUs and the network; training and
evaluating need a GPU. Splitting a character's run at those seams lets CPU workers build the
datasets of upcoming characters while the GPUs train others. A job runs up to a pipeline stage or,
with ``until = "publish"``, also publishes its release (to ``release.publish_to``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafactory.workspace import STAGES


@dataclass(frozen=True)
class Phase:
    name: str
    stages: tuple[str, ...]  # the pipeline stages it runs (none: publishing the release)
    gpu: bool


PHASES = (
    Phase("dataset", ("crawl", "prepare"), gpu=False),
    Phase("model", ("train", "evaluate"), gpu=True),
    Phase("release", ("release",), gpu=False),
    Phase("publish", (), gpu=False),
)
BY_NAME = {phase.name: phase for phase in PHASES}
STEPS = (*STAGES, "publish")  # what a job's ``until`` may name
CPU_PHASES = tuple(phase.name for phase in PHASES if not phase.gpu)
GPU_PHASES = tuple(phase.name for phase in PHASES if phase.gpu)


def phase_of(stage: str) -> str:
    """The phase that runs pipeline ``stage``."""
    return next(phase.name for phase in PHASES if stage in phase.stages)


def last_stage(phase: Phase, until: str) -> str | None:
    """The stage the phase's pipeline run stops at, for a job that stops at ``until``."""
    if not phase.stages:
        return None
    wanted = [stage for stage in phase.stages if STEPS.index(stage) <= STEPS.index(until)]
    return wanted[-1] if wanted else None


def next_phase(current: str, until: str) -> str | None:
    """The phase after ``current`` for a job that stops at ``until``; None when the job is complete."""
    names = [phase.name for phase in PHASES]
    for phase in PHASES[names.index(current) + 1 :]:
        if last_stage(phase, until) is not None or (not phase.stages and until == "publish"):
            return phase.name
    return None
