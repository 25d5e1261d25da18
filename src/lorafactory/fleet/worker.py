"""One queued job run by a fleet worker: the pipeline for its character, under a renewed lease.

Bad settings or input fail the job for good; anything else (a crash, a site down, a busy character)
is transient and the queue retries it. Runs in a Ray worker process or in-process alike.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from lorafactory.config import load_settings
from lorafactory.errors import ConfigError, InputError
from lorafactory.fleet.queue import Claim, JobQueue
from lorafactory.progress import SilentProgress
from lorafactory.redact import redact
from lorafactory.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    job_id: int
    status: str  # done, queued (retry later), failed, lost (the lease went to another worker)
    error: str | None = None


def _renew_until_stopped(queue: JobQueue, claim: Claim, owner: str, lease_s: float, stop: threading.Event) -> None:
    while not stop.wait(lease_s / 3):
        if not queue.renew(claim.id, owner, lease_s):
            log.warning("job %d: lease lost; another worker may run it", claim.id)
            return


def run_job(workspace_root: str, db_url: str, claim: Claim, owner: str, lease_s: float) -> Outcome:
    """Run the claimed job's pipeline and record how it ended in the queue."""
    from lorafactory.pipeline import run_pipeline
    from lorafactory.state import Store

    store = Store(db_url)
    queue = JobQueue(store)
    stop = threading.Event()
    beat = threading.Thread(target=_renew_until_stopped, args=(queue, claim, owner, lease_s, stop), daemon=True)
    beat.start()
    try:
        settings = load_settings(base=claim.settings)
        run_pipeline(Workspace(Path(workspace_root)), store, settings, SilentProgress(), until=claim.until)
    except (ConfigError, InputError) as exc:  # bad settings or input: retrying cannot help
        message = redact(str(exc))
        return Outcome(claim.id, queue.fail(claim.id, owner, message, transient=False), message)
    except Exception as exc:  # noqa: BLE001 - a worker survives any job (another run holding the character
        # included); the queue decides on a retry
        message = redact(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        return Outcome(claim.id, queue.fail(claim.id, owner, message, transient=True), message)
    finally:
        stop.set()
        beat.join()
    return Outcome(claim.id, "done" if queue.finish(claim.id, owner) else "lost")
