"""One claimed phase of a queued job, run by a fleet worker under a renewed lease.

Bad settings or input (and a quality gate that failed every retrain) fail the job for good; an
out-of-memory on the GPU retries it at once with lighter settings; anything else (a crash, a site
down, a busy character) is transient and the queue retries it. A finished phase hands the job on
to the next one. A phase runs none of an earlier phase's stages: when one of those is out of date
(lorafactory was upgraded, or its files were damaged), the job goes back to that phase, on its kind
of worker, instead of crawling on a GPU worker or training on a CPU one. Runs in a Ray worker process
or in-process alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lorafactory.config import Settings, deep_merge, load_settings
from lorafactory.errors import ConfigError, InputError, QualityGateFailed, StaleStage, first_line
from lorafactory.fleet.memory import lighter, out_of_memory
from lorafactory.fleet.phases import BY_NAME, last_stage, next_phase, phase_of
from lorafactory.fleet.queue import Claim, JobQueue
from lorafactory.progress import SilentProgress
from lorafactory.redact import redact
from lorafactory.state import Store
from lorafactory.state.lock import acquire
from lorafactory.workspace import STAGES, Workspace

if TYPE_CHECKING:
    from lorafactory.sources.http import SharedBudget

log = logging.getLogger(__name__)
PERMANENT = (ConfigError, InputError, QualityGateFailed)  # retrying the same settings cannot help


@dataclass(frozen=True)
class Outcome:
    job_id: int
    status: str  # done, queued (next phase or a retry), failed, lost (the lease went to another worker)
    error: str | None = None
    phase: str = ""  # the phase that ran
    next_phase: str | None = None  # where the job went next: the phase after, or an earlier one to redo


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _renew_until_stopped(queue: JobQueue, claim: Claim, owner: str, lease_s: float, stop: threading.Event) -> None:
    while not stop.wait(lease_s / 3):
        if not queue.renew(claim.id, owner, lease_s):
            log.warning("job %d: lease lost; another worker may run it", claim.id)
            return


@lru_cache(maxsize=4)
def _store(db_url: str) -> Store:
    """One store (engine and connection pool) per database for the life of a worker process."""
    return Store(db_url)


def run_job(
    workspace_root: str,
    db_url: str,
    claim: Claim,
    owner: str,
    lease_s: float,
    budget: SharedBudget | None = None,
    run_phase: Callable[..., None] | None = None,
) -> Outcome:
    """Run the claimed phase (with ``run_phase``, by default the pipeline's stages of that phase)
    and record how it ended in the queue."""
    store = _store(db_url)
    queue = JobQueue(store)
    if not queue.renew(claim.id, owner, lease_s, worker=worker_id()):  # cancelled, or reclaimed meanwhile
        return Outcome(claim.id, "lost", phase=claim.phase)
    stop = threading.Event()
    beat = threading.Thread(target=_renew_until_stopped, args=(queue, claim, owner, lease_s, stop), daemon=True)
    beat.start()
    workspace = Workspace(Path(workspace_root))
    settings: Settings | None = None
    try:
        settings = load_settings(base=claim.settings)
        (run_phase or _run_phase)(workspace, store, settings, claim, budget)
    except StaleStage as exc:  # made by an earlier phase: that phase's kind of worker makes it again
        earlier = phase_of(exc.stage)
        log.warning("job %d (%s): %s; back to the %s phase", claim.id, claim.slug, exc, earlier)
        status = queue.send_back(claim.id, owner, earlier, str(exc))
        return Outcome(claim.id, status, str(exc), claim.phase, earlier if status == "queued" else None)
    except Exception as exc:  # noqa: BLE001 - a worker survives any job; the queue decides on a retry
        return _record_failure(queue, store, workspace, settings, claim, owner, exc)
    finally:
        stop.set()
        beat.join()
    following = next_phase(claim.phase, claim.until)
    if following is not None:
        status = "queued" if queue.advance(claim.id, owner, following) else "lost"
        return Outcome(claim.id, status, phase=claim.phase, next_phase=following)
    return Outcome(claim.id, "done" if queue.finish(claim.id, owner) else "lost", phase=claim.phase)


def import_model_libraries() -> None:
    """Import what the model phase runs on (diffusers' pipelines and models, peft, the trainer, the evaluator
    and its scorers), so that a resident GPU worker pays for it as it starts, while the first datasets are
    still being made, not with the GPU waiting on its first job and again after every restart."""
    import imgutils.metrics  # noqa: F401 - CCIP and the other scorers, onnxruntime
    import imgutils.tagging  # noqa: F401
    import matplotlib
    import tensorboardX  # noqa: F401 - the training's event files
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401 - their models too
    from peft import LoraConfig  # noqa: F401

    import lorafactory.evaluate.evaluator  # noqa: F401 - the trainer with it
    import lorafactory.pipeline  # noqa: F401

    matplotlib.use("Agg")  # as the evaluation's plots have it
    import matplotlib.pyplot  # noqa: F401


def _run_phase(ws: Workspace, store: Store, settings: Settings, claim: Claim, budget: SharedBudget | None) -> None:
    from lorafactory.pipeline import run_pipeline, trigger_for

    phase = BY_NAME[claim.phase]
    if phase.stages:
        until = last_stage(phase, claim.until)
        # the job's last stage: pruned files that its later phases read are made again by this one
        goal = claim.until if claim.until in STAGES else "release"
        run_pipeline(
            ws, store, settings, SilentProgress(), until=until, site_budget=budget, start=phase.stages[0], ahead=goal
        )
        if phase.name == "dataset" and next_phase(phase.name, claim.until) is not None:
            from lorafactory.dataset.regularization import set_for

            # the set the model phase will train with, made here on a CPU: not with a GPU waiting on its crawl
            set_for(settings, ws.character(claim.slug), SilentProgress(), store, budget)
        return
    from lorafactory.release.publish import publish

    r = settings.release
    with acquire(store, claim.slug):
        publish(
            ws.character(claim.slug),
            settings,
            trigger_for(settings),
            list(r.publish_to),
            repo=r.hf_repo or claim.slug,
            private=r.hf_private,
            endpoint=r.hf_endpoint,
            progress=SilentProgress(),
            store=store,
        )


def _record_failure(
    queue: JobQueue,
    store: Store,
    ws: Workspace,
    settings: Settings | None,
    claim: Claim,
    owner: str,
    exc: Exception,
) -> Outcome:
    message = redact(first_line(exc))
    if isinstance(exc, PERMANENT) or settings is None:
        return Outcome(claim.id, queue.fail(claim.id, owner, message, transient=False), message, claim.phase)
    if out_of_memory(exc):
        stage = _failed_stage(store, claim.slug)
        layer = lighter(settings, stage) if stage in ("train", "evaluate") else None
        if layer is None:
            message = f"out of GPU memory in {stage} even with the lightest settings: {message}"
            return Outcome(claim.id, queue.fail(claim.id, owner, message, transient=False), message, claim.phase)
        if stage == "train":  # its saved state was made with the heavier settings: start that stage over
            with acquire(store, claim.slug):
                shutil.rmtree(ws.character(claim.slug).partial("train"), ignore_errors=True)
        message = f"out of GPU memory in {stage}; retrying with {json.dumps(layer)}"
        log.warning("job %d: %s", claim.id, message)
        status = queue.fail(
            claim.id, owner, message, transient=True, backoff=False, settings=deep_merge(claim.settings, layer)
        )
        return Outcome(claim.id, status, message, claim.phase)
    return Outcome(claim.id, queue.fail(claim.id, owner, message, transient=True), message, claim.phase)


def _failed_stage(store: Store, slug: str) -> str | None:
    """The stage that failed in the character's latest run."""
    summary = store.character_summary(slug) or {}
    failed = [s["stage"] for s in (summary.get("latest_run") or {}).get("stages", []) if s["status"] == "failed"]
    return failed[-1] if failed else None
