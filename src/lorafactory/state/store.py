"""Store: every write the pipeline makes to the state database goes through here.

Nothing lives only in process memory: a worker on another machine pointed at the same
database URL (PostgreSQL for fleets) sees the same characters, runs and stages.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Iterator

from sqlalchemy import create_engine, delete, event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from lorafactory.errors import ConfigError
from lorafactory.redact import redact
from lorafactory.state.lock import STALE_S, holder_dead
from lorafactory.state.models import (
    SCHEMA_VERSION,
    Base,
    Character,
    CharacterLock,
    Checkpoint,
    Download,
    Metric,
    Publication,
    Run,
    SchemaInfo,
    SiteTag,
    StageExecution,
)
from lorafactory.workspace import utcnow


def _redacted(error: str | None) -> str | None:
    return None if error is None else redact(error)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _add_missing_columns(session: Session) -> None:
    """Columns added to existing tables since they were created (nullable or with a default)."""
    existing = inspect(session.connection())
    dialect = session.bind.dialect
    preparer = dialect.identifier_preparer
    guard = " IF NOT EXISTS" if dialect.name == "postgresql" else ""  # two processes upgrading at once
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=dialect)
            default = f" DEFAULT '{column.server_default.arg}'" if column.server_default is not None else ""
            name, table_name = preparer.quote(column.name), preparer.quote(table.name)
            session.execute(text(f"ALTER TABLE {table_name} ADD COLUMN{guard} {name} {kind}{default}"))


class Store:
    """A handle on the state database at ``url`` (any SQLAlchemy URL)."""

    def __init__(self, url: str, clock: Callable[[], datetime] = utcnow) -> None:
        """``clock`` gives the times recorded (the current UTC time; tests pass a fake one)."""
        self.url = url
        self.clock = clock
        try:
            self.engine: Engine = create_engine(url, future=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"cannot open state database {_safe_url(url)}: {exc}; check --db") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate()

    def _migrate(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise ConfigError(f"cannot open state database {_safe_url(self.url)}: {cause}; check --db") from exc
        with self.session() as session:
            info = session.get(SchemaInfo, 1)
            if info is None:
                session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
            elif info.version < SCHEMA_VERSION:
                _add_missing_columns(session)
                info.version = SCHEMA_VERSION  # migrations only add tables (create_all made them) and columns
            elif info.version > SCHEMA_VERSION:
                raise ConfigError(
                    (
                        f"state database schema v{info.version} is newer than this "
                        f"lorafactory (v{SCHEMA_VERSION}); upgrade lorafactory"
                    )
                )

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @property
    def schema_version(self) -> int:
        with self.session() as session:
            return session.execute(select(SchemaInfo.version)).scalar_one()

    # characters and runs -------------------------------------------------

    def ensure_character(
        self,
        slug: str,
        name: str,
        trigger: str,
        copyright: str | None = None,
        popularity: int | None = None,
        guessed_copyright: str | None = None,
    ) -> int:
        """The character's row, created or updated; ``copyright`` and ``popularity`` (the site's post
        count) are recorded when given and kept otherwise; ``guessed_copyright`` (read from her site tag)
        only when none is known."""
        with self.session() as session:
            character = session.execute(select(Character).where(Character.slug == slug)).scalar_one_or_none()
            if character is None:
                character = Character(slug=slug, name=name, trigger=trigger, created_at=self.clock())
                session.add(character)
            character.name, character.trigger = name, trigger
            if copyright is not None:
                character.copyright = copyright
            elif character.copyright is None:
                character.copyright = guessed_copyright
            if popularity is not None:
                character.popularity = popularity
            session.flush()
            return character.id

    def start_run(self, character_id: int, config_hash: str, source: str | None = None) -> int:
        """A new run of the character; ``source`` is the kind of its images: web, anime or local."""
        self._mark_dead_runs(character_id)
        with self.session() as session:
            run = Run(
                character_id=character_id,
                status="running",
                config_hash=config_hash,
                source=source,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=self.clock(),
            )
            session.add(run)
            session.flush()
            return run.id

    def _mark_dead_runs(self, character_id: int) -> None:
        """Runs left 'running' by a dead process become 'interrupted': a live run holds the
        character's lock with a fresh heartbeat (runs of this very process count as live)."""
        me = (socket.gethostname(), os.getpid())
        with self.session() as session:
            character = session.get(Character, character_id)
            lock = session.get(CharacterLock, character.slug)
            holder = (lock.host, lock.pid) if lock is not None and not holder_dead(lock, STALE_S) else None
            running = session.execute(
                select(Run).where(Run.character_id == character_id, Run.status == "running")
            ).scalars()
            for run in running:
                if (run.host, run.pid) not in (me, holder):
                    run.status = "interrupted"
                    run.finished_at = run.finished_at or self.clock()
                    for stage in run.stages:
                        if stage.status == "running":
                            stage.status = "interrupted"
                            stage.finished_at = self.clock()

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        with self.session() as session:
            run = session.get(Run, run_id)
            run.status, run.error, run.finished_at = status, _redacted(error), self.clock()

    # stages ----------------------------------------------------------------

    def start_stage(self, run_id: int, stage: str, fingerprint: str) -> int:
        with self.session() as session:
            record = StageExecution(
                run_id=run_id, stage=stage, status="running", fingerprint=fingerprint, started_at=self.clock()
            )
            session.add(record)
            session.flush()
            return record.id

    def finish_stage(
        self,
        stage_id: int,
        status: str,
        error: str | None = None,
        counts: dict[str, Any] | None = None,
        gpu_seconds: float | None = None,
    ) -> None:
        with self.session() as session:
            record = session.get(StageExecution, stage_id)
            record.status, record.error, record.finished_at = status, _redacted(error), self.clock()
            record.gpu_seconds = gpu_seconds
            if counts is not None:
                record.counts = counts

    def record_skip(self, run_id: int, stage: str, fingerprint: str) -> None:
        now = self.clock()
        with self.session() as session:
            session.add(
                StageExecution(
                    run_id=run_id,
                    stage=stage,
                    status="skipped",
                    fingerprint=fingerprint,
                    started_at=now,
                    finished_at=now,
                )
            )

    # checkpoints and metrics --------------------------------------------------

    def record_checkpoints(
        self, run_id: int, checkpoints: dict[int, str], metrics: dict[int, dict[str, float | None]], kept: list[int]
    ) -> None:
        """Store each checkpoint with its metrics (None = could not be computed); ``selected`` is the
        step's rank among the kept steps (1 = best, 0 = not kept). A second evaluation in the same
        run (after the quality gate retrained) replaces the first."""
        with self.session() as session:
            old = select(Checkpoint.id).where(Checkpoint.run_id == run_id)
            session.execute(delete(Metric).where(Metric.checkpoint_id.in_(old)))
            session.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id))
            for step, path in sorted(checkpoints.items()):
                checkpoint = Checkpoint(
                    run_id=run_id, step=step, path=path, selected=kept.index(step) + 1 if step in kept else 0
                )
                session.add(checkpoint)
                session.flush()
                for name, value in sorted(metrics.get(step, {}).items()):
                    session.add(Metric(checkpoint_id=checkpoint.id, name=name, value=value))

    # the download archive --------------------------------------------------------

    def archived(self, collection: str) -> dict[tuple[str, str], dict]:
        """(site, post_id) -> the stored post, for everything downloaded for ``collection``."""
        with self.session() as session:
            rows = session.execute(select(Download).where(Download.collection == collection)).scalars()
            return {(row.site, row.post_id): dict(row.post) for row in rows}

    def archive(self, collection: str, site: str, post_id: str, md5: str, filename: str, post: dict) -> None:
        with self.session() as session:
            exists = session.execute(
                select(Download.id).where(
                    Download.collection == collection, Download.site == site, Download.post_id == post_id
                )
            ).first()
            if exists is None:
                session.add(
                    Download(
                        collection=collection,
                        site=site,
                        post_id=post_id,
                        md5=md5,
                        filename=filename,
                        post=post,
                        created_at=self.clock(),
                    )
                )

    def site_tag(self, site: str, name: str) -> tuple[str, int] | None:
        with self.session() as session:
            row = session.execute(
                select(SiteTag).where(SiteTag.site == site, SiteTag.name == name)
            ).scalar_one_or_none()
            return None if row is None else (row.tag, row.post_count)

    def remember_site_tag(self, site: str, name: str, tag: str, post_count: int) -> None:
        with self.session() as session:
            row = session.execute(
                select(SiteTag).where(SiteTag.site == site, SiteTag.name == name)
            ).scalar_one_or_none()
            if row is None:
                session.add(SiteTag(site=site, name=name, tag=tag, post_count=post_count, created_at=self.clock()))
            else:
                row.tag, row.post_count = tag, post_count

    # reading -------------------------------------------------------------------

    def record_publication(
        self, slug: str, target: str, url: str, step: int, release_fingerprint: str, uploaded: int, unchanged: int
    ) -> None:
        with self.session() as session:
            character = session.execute(select(Character).where(Character.slug == slug)).scalar_one()
            session.add(
                Publication(
                    character_id=character.id,
                    target=target,
                    url=url,
                    step=step,
                    release_fingerprint=release_fingerprint,
                    uploaded=uploaded,
                    unchanged=unchanged,
                    published_at=self.clock(),
                )
            )

    def character_summary(self, slug: str) -> dict[str, Any] | None:
        """The character, its latest run with stage records, and the newest checkpoint metrics."""
        with self.session() as session:
            character = session.execute(select(Character).where(Character.slug == slug)).scalar_one_or_none()
        if character is None:
            return None
        self._mark_dead_runs(character.id)  # status never shows a dead run as running
        with self.session() as session:
            character = session.get(Character, character.id)
            runs = character.runs
            latest = runs[-1] if runs else None
            scored = next((run for run in reversed(runs) if run.checkpoints), None)
            return {
                "slug": character.slug,
                "name": character.name,
                "trigger": character.trigger,
                "copyright": character.copyright,
                "popularity": character.popularity,
                "runs": len(runs),
                "latest_run": None if latest is None else _run_dict(latest),
                "checkpoints": [] if scored is None else [_checkpoint_dict(c) for c in scored.checkpoints],
                "publications": [
                    {
                        "target": p.target,
                        "url": p.url,
                        "step": p.step,
                        "uploaded": p.uploaded,
                        "unchanged": p.unchanged,
                        "published_at": p.published_at.isoformat(),
                    }
                    for p in reversed(character.publications)
                ],
            }


def _run_dict(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": run.error,
        "stages": [
            {
                "stage": s.stage,
                "status": s.status,
                "started_at": s.started_at.isoformat(),
                "finished_at": s.finished_at.isoformat() if s.finished_at else None,
                "error": s.error,
                "counts": s.counts,
            }
            for s in run.stages
        ],
    }


def _checkpoint_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "step": checkpoint.step,
        "selected": checkpoint.selected == 1,  # the best step
        "kept_rank": checkpoint.selected or None,  # 1 = best, 2.. = the other released steps
        "metrics": {m.name: m.value for m in checkpoint.metrics},
    }


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown only by its scheme
        return url.split(":", 1)[0] + "://…"
