"""The durable job queue: one row per character in the state store, so it outlives every process.

A job goes through the pipeline in phases (``lorafactory.fleet.phases``): each phase is claimed,
run and then handed on to the next, so a CPU worker can crawl one character while a GPU trains
another. Attempts count per phase.

A claim is one atomic ``UPDATE … RETURNING``: on PostgreSQL its candidate row is picked with
``FOR UPDATE SKIP LOCKED`` (claimers never wait on each other), and on every database the update
re-checks the candidate's status, which SQLite's serialised writers make sufficient. A claimed job
holds a lease that its worker renews; a job whose lease ran out (its worker or machine died) is
claimed again, and after ``max_attempts`` claims it is quarantined instead: a job that keeps
killing its worker stops doing so. Bad input fails a job for good with its reason; a transient
failure puts it back in the queue after an exponential backoff.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import aliased

from lorafactory.state.models import Job, Run, StageExecution, as_utc
from lorafactory.workspace import utcnow

ACTIVE = ("queued", "running")
BACKOFF_S, BACKOFF_CAP_S = 30.0, 3600.0
LEASE_S = 120.0  # a claim's lease; its worker renews it every third of that
MAX_RETURNS = 2  # times a job may go back to an earlier phase whose output is out of date


@dataclass(frozen=True)
class Claim:
    """A job this worker holds: run it, renew the lease, then finish or fail it."""

    id: int
    slug: str
    name: str
    settings: dict
    until: str
    attempt: int
    phase: str = "dataset"


class JobQueue:
    """The queue in a state store (``lorafactory.state.Store``); safe to use from many processes."""

    def __init__(self, store, max_attempts: int = 3) -> None:
        self.store, self.max_attempts = store, max_attempts

    def add(self, slug: str, name: str, settings: dict, priority: int = 0, until: str = "release") -> int:
        """Queue a character; a character already queued or running keeps its job (its id is returned)."""
        with self.store.session() as session:
            existing = session.execute(
                select(Job.id).where(Job.slug == slug, Job.status.in_(ACTIVE))
            ).scalar_one_or_none()
            if existing is not None:
                return existing
            job = Job(
                slug=slug,
                name=name,
                settings=settings,
                until=until,
                status="queued",
                priority=priority,
                attempts=0,
                max_attempts=self.max_attempts,
                created_at=utcnow(),
            )
            session.add(job)
            session.flush()
            return job.id

    @staticmethod
    def _claimable(jobs, now: datetime, phases: tuple[str, ...] | None):
        waiting = and_(jobs.status == "queued", or_(jobs.not_before.is_(None), jobs.not_before <= now))
        abandoned = and_(jobs.status == "running", jobs.lease_until < now, jobs.attempts < jobs.max_attempts)
        claimable = or_(waiting, abandoned)
        return claimable if phases is None else and_(claimable, jobs.phase.in_(phases))

    def claim(self, owner: str, lease_s: float, phases: tuple[str, ...] | None = None) -> Claim | None:
        """The most urgent claimable job (in one of ``phases``, when given), now leased to ``owner``
        for ``lease_s`` seconds; None when nothing is claimable."""
        self.quarantine_abandoned()
        now = utcnow()
        pick = aliased(Job)  # the candidate query reads its own copy of the table, never the updated row
        candidate = (
            select(pick.id)
            .where(self._claimable(pick, now, phases))
            .order_by(pick.priority.desc(), pick.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=pick)
            .scalar_subquery()
        )
        statement = (
            update(Job)
            .where(Job.id == candidate, self._claimable(Job, now, phases))  # re-checked: SQLite drops SKIP LOCKED
            .values(
                status="running",
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_s),
                attempts=Job.attempts + 1,
                not_before=None,
                worker=None,
            )
            .returning(Job.id, Job.slug, Job.name, Job.settings, Job.until, Job.attempts, Job.phase)
            .execution_options(synchronize_session=False)
        )
        with self.store.session() as session:
            row = session.execute(statement).first()
        return None if row is None else Claim(*row)

    def quarantine_abandoned(self) -> int:
        """Jobs whose lease ran out on their last allowed attempt are set aside; returns how many."""
        now = utcnow()
        statement = (
            update(Job)
            .where(Job.status == "running", Job.lease_until < now, Job.attempts >= Job.max_attempts)
            .values(
                status="quarantined",
                finished_at=now,
                last_error="its worker stopped without finishing it on every attempt (quarantined)",
            )
            .execution_options(synchronize_session=False)
        )
        with self.store.session() as session:
            return session.execute(statement).rowcount

    def _owned(self, job_id: int, owner: str):
        return and_(Job.id == job_id, Job.status == "running", Job.lease_owner == owner)

    def renew(self, job_id: int, owner: str, lease_s: float, worker: str | None = None) -> bool:
        """Extend the lease (and record the ``worker`` process running the job, when given); False when
        the job is no longer this owner's (its lease ran out and another took it)."""
        values: dict = {"lease_until": utcnow() + timedelta(seconds=lease_s)}
        if worker is not None:
            values["worker"] = worker
        return self._update_owned(job_id, owner, **values)

    def finish(self, job_id: int, owner: str) -> bool:
        return self._update_owned(
            job_id, owner, status="done", finished_at=utcnow(), lease_until=None, last_error=None
        )

    def advance(self, job_id: int, owner: str, phase: str) -> bool:
        """The job's current phase is done: queue it at once for ``phase``, with fresh attempts."""
        return self._queue_for(job_id, owner, phase, last_error=None)

    def _queue_for(self, job_id: int, owner: str, phase: str, **values) -> bool:
        """Queue the job at once for ``phase``, with fresh attempts (and ``values``), while ``owner`` holds it."""
        return self._update_owned(
            job_id, owner, status="queued", phase=phase, attempts=0, lease_owner=None, lease_until=None, **values
        )

    def send_back(self, job_id: int, owner: str, phase: str, reason: str) -> str:
        """An earlier ``phase``'s output is out of date (``reason``): queue the job for it again at once, with
        fresh attempts. A job already sent back ``MAX_RETURNS`` times fails instead: its workers keep
        disagreeing on what is up to date, as workers of different lorafactory versions do. Returns the
        job's new status."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            returns = job.returns if job is not None else 0
        if returns >= MAX_RETURNS:
            reason = f"{reason}; sent back {returns} times already: run one lorafactory version on every worker"
            return self.fail(job_id, owner, reason, transient=False)
        closed = self._queue_for(job_id, owner, phase, last_error=reason, returns=Job.returns + 1)
        return "queued" if closed else "lost"

    def fail(
        self,
        job_id: int,
        owner: str,
        error: str,
        transient: bool,
        backoff: bool = True,
        settings: dict | None = None,
        crashed: bool = False,
    ) -> str:
        """Record a failure: a transient one requeues the job (after an exponential backoff, unless
        ``backoff`` is off; with new ``settings`` when given) while attempts remain; bad input, or the
        last attempt, fails it for good, and a job whose worker ``crashed`` on every attempt is
        quarantined. Returns the job's new status."""
        with self.store.session() as session:
            job = session.get(Job, job_id)
            retry = transient and job is not None and job.attempts < job.max_attempts
            attempts = job.attempts if job is not None else 1
        if retry:
            delay = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempts - 1)) if backoff else 0.0
            values = dict(status="queued", not_before=utcnow() + timedelta(seconds=delay), lease_until=None)
            if settings is not None:  # a retry with other settings (lighter, after an out-of-memory) is a new try
                values.update(settings=settings, attempts=Job.attempts - 1)
        elif crashed and transient:
            error = f"{error}; its worker died on every attempt (quarantined)"
            values = dict(status="quarantined", finished_at=utcnow(), lease_until=None)
        else:
            values = dict(status="failed", finished_at=utcnow(), lease_until=None)
        closed = self._update_owned(job_id, owner, last_error=error, lease_owner=None, **values)
        return values["status"] if closed else "lost"

    def _update_owned(self, job_id: int, owner: str, **values) -> bool:
        """Set ``values`` on the job while ``owner`` holds its lease; False when it no longer does."""
        statement = (
            update(Job).where(self._owned(job_id, owner)).values(**values).execution_options(synchronize_session=False)
        )
        with self.store.session() as session:
            return session.execute(statement).rowcount == 1

    def _select(self, refs: list[str]):
        """Jobs named by id or by character slug."""
        ids = [int(ref) for ref in refs if ref.isdigit()]
        slugs = [ref for ref in refs if not ref.isdigit()]
        return or_(Job.id.in_(ids), Job.slug.in_(slugs))

    def retry(self, refs: list[str]) -> int:
        """Queue failed, quarantined or cancelled jobs again with fresh attempts (the newest job of
        each character, and none whose character has an active job); returns how many."""
        with self.store.session() as session:
            ended = session.execute(
                select(Job.id, Job.slug)
                .where(self._select(refs), Job.status.in_(("failed", "quarantined", "cancelled")))
                .order_by(Job.id)
            ).all()
            newest = {slug: job_id for job_id, slug in ended}
            busy = set(session.execute(select(Job.slug).where(Job.slug.in_(newest), Job.status.in_(ACTIVE))).scalars())
            chosen = [job_id for slug, job_id in newest.items() if slug not in busy]
            if chosen:
                session.execute(
                    update(Job)
                    .where(Job.id.in_(chosen))
                    .values(
                        status="queued", attempts=0, returns=0, not_before=None, lease_owner=None, finished_at=None
                    )
                    .execution_options(synchronize_session=False)
                )
            return len(chosen)

    def cancel(self, refs: list[str]) -> int:
        """Cancel queued or running jobs (a running one's worker can no longer finish it); returns how many."""
        statement = (
            update(Job)
            .where(self._select(refs), Job.status.in_(ACTIVE))
            .values(status="cancelled", finished_at=utcnow(), lease_until=None)
            .execution_options(synchronize_session=False)
        )
        with self.store.session() as session:
            return session.execute(statement).rowcount

    def pending(self) -> bool:
        """Whether any job is still queued (perhaps waiting out a backoff) or running."""
        with self.store.session() as session:
            return session.execute(select(Job.id).where(Job.status.in_(ACTIVE)).limit(1)).first() is not None

    def waiting(self, phase: str) -> int:
        """Jobs queued for ``phase`` (not yet running)."""
        with self.store.session() as session:
            return session.execute(
                select(func.count()).select_from(Job).where(Job.status == "queued", Job.phase == phase)
            ).scalar_one()

    def summary(self, now: datetime | None = None) -> dict:
        """The fleet at a glance: jobs per status, queued and running jobs per phase, running jobs per
        host, done and failed since midnight (UTC), models released and jobs done over the last 24 hours,
        and when the queue should be empty at the pace of those jobs. A model is a release made (a job whose
        stages were all up to date, or that stopped before its release, made none). The pace is measured
        since the earliest run still going or ended in the last 24 hours: a fleet started an hour ago is
        judged by that hour, not by a day it was not running."""
        now = now or utcnow()
        midnight, day_ago = now.replace(hour=0, minute=0, second=0, microsecond=0), now - timedelta(days=1)
        with self.store.session() as session:
            rows = session.execute(select(Job.status, Job.phase, Job.lease_owner, Job.worker, Job.finished_at)).all()
            models = session.execute(
                select(func.count())
                .select_from(StageExecution)
                .where(
                    StageExecution.stage == "release",
                    StageExecution.status == "succeeded",
                    StageExecution.finished_at > day_ago,
                )
            ).scalar_one()
            first_run = session.execute(
                select(func.min(Run.started_at)).where(or_(Run.finished_at.is_(None), Run.finished_at > day_ago))
            ).scalar_one()
        by_status = Counter(row.status for row in rows)
        ended = [(row.status, as_utc(row.finished_at)) for row in rows if row.finished_at is not None]
        per_day = sum(1 for status, finished in ended if status == "done" and finished > day_ago)
        waiting = by_status.get("queued", 0) + by_status.get("running", 0)
        since = max(day_ago, as_utc(first_run)) if first_run is not None else day_ago
        pace_hours = max((now - since).total_seconds() / 3600, 1 / 60)  # at least a minute: no division by 0
        pace = per_day * 24 / pace_hours  # jobs a day at the pace since `since`
        return {
            "by_status": dict(sorted(by_status.items())),
            "queued_per_phase": dict(Counter(row.phase for row in rows if row.status == "queued")),
            "running_per_phase": dict(Counter(row.phase for row in rows if row.status == "running")),
            "running_per_host": dict(
                Counter(
                    (row.worker or row.lease_owner).split(":")[0]
                    for row in rows
                    if row.status == "running" and (row.worker or row.lease_owner)
                )
            ),
            "done_today": sum(1 for status, finished in ended if status == "done" and finished >= midnight),
            "failed_today": sum(
                1 for status, finished in ended if status in ("failed", "quarantined") and finished >= midnight
            ),
            "models_per_day": models,
            "jobs_per_day": per_day,
            "pace_per_day": round(pace, 1),
            "pace_hours": round(pace_hours, 2),
            "eta_hours": round(waiting / pace * 24, 1) if pace and waiting else (0.0 if not waiting else None),
        }

    def jobs(self, statuses: tuple[str, ...] = ()) -> list[Job]:
        """Jobs, most urgent first (detached rows, for listing)."""
        query = select(Job).order_by(Job.priority.desc(), Job.id)
        if statuses:
            query = query.where(Job.status.in_(statuses))
        with self.store.session() as session:
            rows = session.execute(query).scalars().all()
            session.expunge_all()
            return list(rows)
